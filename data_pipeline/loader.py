"""TokenLoader: token shards -> packed `(batch_size, seq_len + 1)` int64 batches, exactly resumable.

The stream, per DP rank:
  1. Each *slot* (slot = dp_rank * W + worker, W = max(num_workers, 1)) reads its share of every epoch as
     planned in `plan.py`: seeded shard order per epoch, a contiguous sample range per slot (so nothing is
     lost or read twice, whatever the shard count), a seeded in-shard shuffle buffer.
  2. With several sources, a seeded per-document draw picks the source; `weights` are token shares (the draw
     probability is divided by the source's mean document length).
  3. Documents (each ending in eos) are packed back to back into rows of seq_len + 1 tokens; a document that
     does not fit continues in the next row. `doc_ids` numbers the documents within each row (0, 0, 1, 1, ...).
  4. With workers, torch's DataLoader returns batches round-robin over workers (skipping finished ones).

Resume: every batch carries its slot's *cursor* as of the end of that batch -- per source (epoch, segment,
offset in the shuffled segment), the partially packed document (its position and how many tokens were used)
and the mixture draw count. The main process keeps the cursor of the last batch *delivered* from each worker
plus which worker is next, so `state_dict()` describes exactly what the caller has consumed, never what
workers prefetched. On resume each worker jumps to its cursor; at most the current shard segment is re-read
(without decoding) to rebuild the shuffle buffer, and the DataLoader's worker ids are rotated so the
round-robin continues with the right worker. On another dp_size or worker count, the states of all old ranks
re-split the rest of the epoch exactly (partition.py, loader_state.py; see `TokenLoader.load_state_dict`).

Trust: every shard is read to its end and checked there against its manifest entry (sha256 of the bytes read,
sample count; shard_reader.py), before the slot reads anything of its next shard: see `_read_segment`.

With a finite `epochs`, a slot's last incomplete batch is dropped and the number of dropped tokens is logged.
With several sources, the stream ends when the first source runs out of epochs.
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data_pipeline import errors
from data_pipeline.errors import DataError, LoaderStateError, ShardError, ShardMismatchError
from data_pipeline.handlers import CountingHandler
from data_pipeline.manifest import Manifest, ShardInfo
from data_pipeline.loader_state import (MERGED, STATE_FORMAT, STATE_VERSION, check_state, dataset_changes,
                                        dataset_of, history_of, merge_states, plain_cursor, resplit, workers_of)
from data_pipeline.partition import Change, Partition
from data_pipeline.plan import Segment, check_split, mixture_draws
from data_pipeline.shard_reader import decode_tokens, iter_raw_samples
from data_pipeline.shardset import ShardSet, resolve

__all__ = ["TokenLoader", "LoaderStateError", "merge_states"]
log = logging.getLogger(__name__)
_DRAW_BLOCK = 4096


@dataclass(frozen=True)
class _Plan:
    """Everything a worker needs (picklable): sources and the loader's settings."""
    sources: tuple[ShardSet, ...]
    probs: tuple[float, ...]  # per-document draw probabilities (cumulative use)
    seq_len: int
    batch_size: int
    dp_rank: int
    workers: int              # slots per rank: max(num_workers, 1)
    dp_size: int
    seed: int
    shuffle_buffer: int
    document_mask: bool
    epochs: int | None
    max_bad_shards: int
    history: tuple[Change, ...] = ()  # earlier layouts whose unconsumed samples this one re-split

    @property
    def num_slots(self) -> int:
        return self.dp_size * self.workers

    def partition(self) -> Partition:
        return Partition([ss.samples for ss in self.sources], self.seed, self.shuffle_buffer, self.history,
                         self.num_slots)


# ---- reading one slot's documents ---------------------------------------------------------------------------
def _read_segment(url: str, seg: Segment, perm: list[int], offset: int,
                  info: ShardInfo) -> Iterator[tuple[int, bytes]]:
    """Yield (offset, tokens.npy bytes) for perm[offset:], reading the shard once, from its start to its end.

    The whole shard is read, also on a resume at offset k (the samples before k are read again, undecoded, to
    rebuild the shuffle buffer) and when the segment ends before the shard does, so that its sha256 and
    sample count are checked against `info` (the manifest entry) at its end: a ShardMismatchError then.
    What that check can protect: a sample is yielded as soon as the shuffle order lets it out, so the samples
    released while the shard streams may already be in batches (and optimizer steps) before the error; the
    ones released only once the segment's last sample is read wait for the check. No sample of the slot's next
    shard is read before it.
    """
    emitted = set(perm[:offset])
    local = None if seg.members is None else {m: k for k, m in enumerate(seg.members)}
    held: dict[int, dict] = {}
    p, n, last = offset, len(perm), seg.stop - 1
    for i, (key, parts) in enumerate(iter_raw_samples(url, expect=info)):
        if i < seg.start or i > last:
            continue  # before the segment: skipped undecoded; after it: read only for the shard's check
        k = i - seg.start if local is None else local.get(i)
        if k is None or k in emitted:
            continue
        held[k] = parts
        while i < last and p < n and perm[p] in held:
            yield p, held.pop(perm[p]).get("tokens.npy")
            p += 1
    # here the shard has been read to its end and matched its manifest entry
    while p < n and perm[p] in held:
        yield p, held.pop(perm[p]).get("tokens.npy")
        p += 1
    if p < n:  # cannot happen once the sample count matched; kept as a guard against a plan/shard mismatch
        raise ShardError(f"{url}: only {p} of the {n} samples planned from it were found (run `pretrain-data "
                         "verify`)")


def _tokens(blob: bytes | None, where: str, shards: ShardSet) -> np.ndarray:
    """A sample's tokens, each an id of the manifest's tokenizer. An id past its vocabulary would index past the
    embedding table: an IndexError deep in a step on CPU, a device-side assert on GPU."""
    tokens = decode_tokens(blob, where)
    vocab = shards.manifest.tokenizer.vocab_size
    if tokens.size and int(tokens.max()) >= vocab:
        raise ShardError(f"{where}: token id {int(tokens.max())} is outside the manifest's tokenizer vocabulary "
                         f"({vocab} ids): this shard was not made with that tokenizer")
    return tokens


def _read_one(shards: ShardSet, shard: int, index: int) -> np.ndarray:
    """The tokens of sample `index` (tar order) of one shard: a document carried over a layout change.

    The shard is read to its end for its sha256/sample-count check (the carried document is returned only
    after it): after a layout change each slot does this for at most a few carried documents."""
    url = shards.urls[shard]
    found = None
    for i, (_, parts) in enumerate(iter_raw_samples(url, expect=shards.shards[shard])):
        if i == index:
            found = parts.get("tokens.npy")
    if found is None:
        raise ShardError(f"{url}: has no sample {index} (manifest says {shards.shards[shard].samples}; run "
                         "`pretrain-data verify`)")
    return _tokens(found, f"{url}[sample {index}]", shards)


class _DocStream:
    """One source's documents for one slot, across epochs; `pos` = (epoch, segment, offset) of the next doc."""

    def __init__(self, plan: _Plan, partition: Partition, source: int, slot: int, pos: tuple[int, int, int],
                 bad_shards: CountingHandler):
        self.plan, self.partition, self.source, self.slot, self.bad_shards = plan, partition, source, slot, bad_shards
        self.shards = plan.sources[source]
        self.pos = tuple(pos)
        self._segments: dict[int, list[Segment]] = {}
        self._it = self._gen()

    def segments(self, epoch: int) -> list[Segment]:
        if epoch not in self._segments:
            self._segments = {epoch: self.partition.segments(self.source, epoch, self.slot)}
        return self._segments[epoch]

    def _gen(self):
        plan = self.plan
        e, g, o = self.pos
        while plan.epochs is None or e < plan.epochs:
            segs = self.segments(e)
            while g < len(segs):
                seg = segs[g]
                perm = self.partition.order(self.source, e, self.slot, g, seg.size)
                url = self.shards.urls[seg.shard]
                try:
                    for off, blob in _read_segment(url, seg, perm, o, self.shards.shards[seg.shard]):
                        here = (e, g, off)
                        if off + 1 < seg.size:
                            self.pos = (e, g, off + 1)
                        elif g + 1 < len(segs):
                            self.pos = (e, g + 1, 0)
                        else:
                            self.pos = (e + 1, 0, 0)
                        yield here, _tokens(blob, f"{url}[sample {seg.index(perm[off])}]", self.shards)
                except ShardError as err:  # raises past max_bad_shards; else the segment's rest is skipped
                    if self.bad_shards.max_errors == 0:
                        raise
                    lost = ("not yet delivered" if isinstance(err, ShardMismatchError) else "not yet read")
                    self.bad_shards(ShardError(f"{err} [its samples in {seg.start}-{seg.stop - 1} {lost} in "
                                               f"epoch {e} are lost for this epoch]"))
                    if g + 1 < len(segs):
                        self.pos = (e, g + 1, 0)
                    else:
                        self.pos = (e + 1, 0, 0)
                g, o = g + 1, 0
            e, g, o = e + 1, 0, 0
            self.pos = (e, 0, 0)

    def next(self):
        """(position, tokens) of the next document, or None when the epochs are done."""
        return next(self._it, None)


# ---- packing -------------------------------------------------------------------------------------------------
def _slot_batches(plan: _Plan, slot: int, cursor: dict | None) -> Iterator[tuple[dict, dict]]:
    """Packed batches of one slot, each with the cursor that resumes right after it."""
    n_src = len(plan.sources)
    cursor = cursor or {"streams": [[0, 0, 0]] * n_src, "pending": None, "draws": 0}
    pend = cursor["pending"]
    streams = []
    bad_shards = CountingHandler(plan.max_bad_shards, what="bad shards")
    partition = plan.partition()
    for s in range(n_src):
        pos = pend["pos"] if pend is not None and pend["source"] == s else cursor["streams"][s]
        streams.append(_DocStream(plan, partition, s, slot, tuple(pos), bad_shards))
    draws = int(cursor["draws"])
    carry = [list(c) for c in cursor.get("carry") or []]  # handed over by a layout change: packed first
    pending = None  # [source, pos (None: carry[0]), tokens, taken]
    if pend is not None:
        item = streams[pend["source"]].next()
        if item is None:
            raise LoaderStateError(f"loader state: slot {slot} has a partial document past the end of the data")
        pending = [pend["source"], item[0], item[1], int(pend["taken"])]
    cum = np.cumsum(plan.probs)
    block, uniforms = -1, None

    row = plan.seq_len + 1
    need = plan.batch_size * row
    while True:
        out = np.empty(need, dtype=np.int64)
        starts = np.zeros(need, dtype=bool) if plan.document_mask else None
        filled = 0
        while filled < need:
            if pending is None and carry:
                src, shard, index, taken = carry[0]
                pending = [src, None, _read_one(plan.sources[src], shard, index), taken]
            if pending is None:
                src = 0
                if n_src > 1:
                    if draws // _DRAW_BLOCK != block:
                        block = draws // _DRAW_BLOCK
                        uniforms = mixture_draws(plan.seed, slot, block, _DRAW_BLOCK)
                    src = min(int(np.searchsorted(cum, uniforms[draws % _DRAW_BLOCK], side="right")), n_src - 1)
                    draws += 1
                item = streams[src].next()
                if item is None:
                    if filled:
                        log.warning("data loader slot %d: end of %s epoch(s) of %s; dropped the last incomplete "
                                    "batch (%d tokens)", slot, plan.epochs, plan.sources[src].spec, filled)
                    return
                pending = [src, item[0], item[1], 0]
            src, pos, tokens, taken = pending
            take = min(len(tokens) - taken, need - filled)
            out[filled:filled + take] = tokens[taken:taken + take]
            if starts is not None:
                starts[filled] = True
            filled += take
            taken += take
            if taken < len(tokens):
                pending = [src, pos, tokens, taken]
            else:
                pending = None
                if pos is None:
                    carry.pop(0)
        batch = {"tokens": torch.from_numpy(out.reshape(plan.batch_size, row))}
        if starts is not None:
            starts = starts.reshape(plan.batch_size, row)
            starts[:, 0] = False  # each row numbers its documents from 0
            batch["doc_ids"] = torch.from_numpy(np.cumsum(starts, axis=1, dtype=np.int64))
        if pending is not None and pending[1] is None:
            carry[0][3] = pending[3]
        new_cursor = {
            "streams": [list(s.pos) for s in streams],
            "pending": None if pending is None or pending[1] is None else {
                "source": pending[0], "pos": list(pending[1]), "taken": pending[3]},
            "draws": draws,
            "carry": [list(c) for c in carry],
        }
        yield batch, new_cursor


class _WorkerDataset(IterableDataset):
    """What each DataLoader worker runs: its slot's batches, tagged with worker index and cursor."""

    def __init__(self, plan: _Plan, cursors: list, first_worker: int):
        super().__init__()
        self.plan, self.cursors, self.first_worker = plan, cursors, first_worker

    def __iter__(self):
        info = get_worker_info()
        physical = info.id if info is not None else 0
        worker = (self.first_worker + physical) % self.plan.workers  # rotation: round-robin resumes in place
        slot = self.plan.dp_rank * self.plan.workers + worker
        try:
            for batch, cursor in _slot_batches(self.plan, slot, self.cursors[worker]):
                batch["_worker"], batch["_cursor"] = worker, cursor
                yield batch
        except DataError as e:  # one line to the main process, not a worker traceback
            yield {"_worker": worker, "_error": str(e), "_error_type": type(e).__name__}


# ---- the public loader ---------------------------------------------------------------------------------------
class TokenLoader:
    """Packed, shuffled, DP/worker-split, exactly resumable token batches from webdataset shards.

    sources: a shard dir, glob, brace pattern or `pipe:` URL, or a list of them (a mixture; `weights` are token
    shares, default proportional to each source's tokens). A corrupt shard is an error, unless max_bad_shards > 0:
    then up to that many failures per slot are skipped with a log line each (their remaining samples are lost
    for that epoch, which the log says). Iterating yields dicts with "tokens"
    (batch_size, seq_len + 1) int64 and, with document_mask=True, "doc_ids" of the same shape.
    """

    def __init__(self, sources: str | list[str], *, seq_len: int, batch_size: int, dp_rank: int = 0,
                 dp_size: int = 1, num_workers: int = 0, seed: int = 0, shuffle_buffer: int = 1000,
                 weights: list[float] | None = None, document_mask: bool = False, reshard: bool = False,
                 epochs: int | None = None, max_bad_shards: int = 0):
        specs = [sources] if isinstance(sources, str) else list(sources)
        if not specs:
            raise DataError("TokenLoader: no sources given")
        if seq_len < 1 or batch_size < 1:
            raise DataError(f"TokenLoader: seq_len ({seq_len}) and batch_size ({batch_size}) must be >= 1")
        if not 0 <= dp_rank < dp_size:
            raise DataError(f"TokenLoader: dp_rank {dp_rank} is not in [0, dp_size={dp_size})")
        if num_workers < 0 or (epochs is not None and epochs < 1):
            raise DataError(f"TokenLoader: num_workers ({num_workers}) must be >= 0, epochs ({epochs}) >= 1 or None")
        sets = [resolve(spec) for spec in specs]
        first = sets[0].manifest
        for other in sets[1:]:
            if other.manifest.tokenizer_hash != first.tokenizer_hash:
                raise DataError(f"sources disagree on the tokenizer: {sets[0].spec} has "
                                f"{first.tokenizer_hash[:12]}, {other.spec} has {other.manifest.tokenizer_hash[:12]}")
        tokens = [sum(s.tokens for s in ss.shards) for ss in sets]
        samples = [sum(ss.samples) for ss in sets]
        if weights is None:
            weights = [float(t) for t in tokens]
        if len(weights) != len(sets) or any(w < 0 for w in weights) or sum(weights) <= 0:
            raise DataError(f"TokenLoader: weights {weights} must be {len(sets)} non-negative numbers, not all zero")
        share = [w / sum(weights) for w in weights]
        per_doc = [w * n / t if t else 0.0 for w, n, t in zip(share, samples, tokens)]  # token share -> doc draws
        probs = tuple(p / sum(per_doc) for p in per_doc)
        workers = max(num_workers, 1)
        for ss, n in zip(sets, samples):
            check_split(ss.spec, n, dp_size, num_workers)
        self._plan = _Plan(tuple(sets), probs, seq_len, batch_size, dp_rank, workers, dp_size, seed,
                           shuffle_buffer, document_mask, epochs, max_bad_shards)
        self.num_workers = num_workers
        self.reshard = reshard
        self.manifest: Manifest = first
        self.weights = tuple(share)
        self.fingerprint = hashlib.sha256(
            ("|".join(ss.fingerprint for ss in sets) + f"|{[round(w, 12) for w in share]}").encode()).hexdigest()
        self.dataset = dataset_of(sets, share)  # what the fingerprint is of, to name what changed on resume
        self._cursors: list[dict | None] = [None] * workers
        self._next_worker = 0
        self._delivered = 0
        self.resume_note: str | None = None  # what the last load_state_dict did, when it was not a plain resume

    # -- iteration --
    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        """Continue from the current position (a new `for` loop picks up where the last one stopped).

        Only the newest iterator is live: an older one stops, so two cannot both advance the state.
        """
        plan = self._plan
        self._generation = generation = getattr(self, "_generation", 0) + 1
        if self.num_workers == 0:
            for batch, cursor in _slot_batches(plan, plan.dp_rank, self._cursors[0]):
                if self._generation != generation:
                    return
                self._cursors[0] = cursor
                self._delivered += 1
                yield batch
            return
        dataset = _WorkerDataset(plan, list(self._cursors), self._next_worker)
        loader = DataLoader(dataset, batch_size=None, num_workers=self.num_workers, prefetch_factor=2,
                            persistent_workers=False)
        it = iter(loader)
        try:
            for batch in it:
                if self._generation != generation:
                    return
                if "_error" in batch:
                    raise getattr(errors, batch["_error_type"], DataError)(batch["_error"])
                worker = batch.pop("_worker")
                self._cursors[worker] = batch.pop("_cursor")
                self._next_worker = (worker + 1) % plan.workers
                self._delivered += 1
                yield batch
        finally:
            shutdown = getattr(it, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()

    # -- resume --
    def state_dict(self) -> dict:
        """This rank's position after the last batch handed to the caller (JSON types only)."""
        p = self._plan
        return {"format": STATE_FORMAT, "version": STATE_VERSION, "fingerprint": self.fingerprint,
                "dp_rank": p.dp_rank, "dp_size": p.dp_size, "num_workers": self.num_workers, "seed": p.seed,
                "shuffle_buffer": p.shuffle_buffer, "next_worker": self._next_worker,
                "cursors": [plain_cursor(c) for c in self._cursors], "batches_delivered": self._delivered,
                "history": [c.to_json() for c in p.history], "dataset": self.dataset}

    def load_state_dict(self, state: dict | list[dict]) -> None:
        """Resume from this rank's state, or from every old DP rank's states (a list, or `merge_states` of it).

        - Same dp_size and workers per rank (num_workers 0 and 1 count as one): this rank's own state is
          taken and the identical token stream continues.
        - Another dp_size or worker count, with the states of ALL old DP ranks: the rest of the interrupted
          epoch(s) is re-split exactly over the new ranks x workers (logged in one line, also kept in
          `self.resume_note`). Exact means: over each epoch of each source, every document is packed exactly
          once across the old and the new layout -- none lost, none repeated -- and a document the old packers
          were in the middle of continues, from the token where it stopped, in exactly one new slot (first
          thing it packs). What differs from a run that never changed layout: which rank reads which document,
          their order, where rows and batches cut documents, and the mixture draws. Not covered (as without a
          change): each slot's last incomplete batch dropped at the end of a finite `epochs`, and the unread
          rest of a shard skipped under max_bad_shards. Later epochs use the normal split of the new layout.
        - Refused with a one-line LoaderStateError: another dataset fingerprint (shards, manifest, mixture
          weights: the message names the shards added, removed or modified and the weights, when the state
          recorded them), seed or shuffle buffer; another layout with only some old ranks' states; another dp_rank's
          state alone. With `reshard=True` these restart the earliest saved epoch on the new layout instead
          (logged: documents of that epoch already seen may be seen again).
        """
        given = [check_state(s) for s in (state if isinstance(state, (list, tuple)) else [state])]
        flat = [r for s in given for r in (s["ranks"] if s.get("kind") == MERGED else [s])]
        if not flat:
            raise LoaderStateError("loader state: an empty list of states")
        p = self._plan
        first = flat[0]
        mismatches = []
        if changed := next((s for s in flat if s["fingerprint"] != self.fingerprint), None):
            what = dataset_changes(changed.get("dataset"), self.dataset) or "other shards, manifest or weights"
            mismatches.append(f"dataset changed (fingerprint {changed['fingerprint'][:12]} -> "
                              f"{self.fingerprint[:12]}: {what})")
        for key, now in (("seed", p.seed), ("shuffle_buffer", p.shuffle_buffer)):
            if first[key] != now:
                mismatches.append(f"{key} {first[key]} -> {now}")
        if mismatches:
            return self._restart(flat, mismatches)
        self.resume_note = None
        if int(first["dp_size"]) == p.dp_size and workers_of(first) == p.workers:
            own = [s for s in flat if int(s["dp_rank"]) == p.dp_rank]
            if not own:
                return self._restart(flat, [f"dp_rank {first['dp_rank']} -> {p.dp_rank}"])
            if len(own) > 1:
                merge_states(own)  # refuses two different states of one rank
            own = own[0]
            self._plan = dataclasses.replace(p, history=history_of(own))
            self._cursors = [plain_cursor(c) for c in own["cursors"]]
            self._next_worker = int(own["next_worker"])
            self._delivered = int(own.get("batches_delivered", 0))
            return None
        change = ", ".join(([f"dp_size {first['dp_size']} -> {p.dp_size}"] if first["dp_size"] != p.dp_size else [])
                           + ([f"num_workers {first['num_workers']} -> {self.num_workers}"]
                              if workers_of(first) != p.workers else []))
        try:
            merged = merge_states(flat)
        except LoaderStateError as e:
            return self._restart(flat, [f"{change}: an exact re-split needs the loader states of all old DP ranks "
                                        f"as a list ({e})"])
        split = resplit(merged, [ss.samples for ss in p.sources], dp_rank=p.dp_rank, dp_size=p.dp_size,
                        workers=p.workers, epochs=p.epochs)
        (log.warning if p.dp_rank == 0 else log.info)("%s", split.message)
        self.resume_note = split.message
        self._plan = dataclasses.replace(p, history=split.history)
        self._cursors = split.cursors
        self._next_worker = 0
        self._delivered = 0
        return None

    def _restart(self, states: list[dict], reasons: list[str]) -> None:
        """An inexact resume: refused, or with reshard=True the earliest saved epoch starts again."""
        if not self.reshard:
            raise LoaderStateError("cannot resume the data loader exactly: " + "; ".join(reasons)
                                   + " (pass reshard=True, in `pretrain train` data.reshard=true, to restart the "
                                   "earliest saved epoch with the new layout)")
        p = self._plan
        seen = [pos[0] for s in states for c in s["cursors"] if c is not None for pos in c["streams"]]
        epochs = [min(seen, default=0)] * len(p.sources)  # the sources may differ from the saved ones
        self.resume_note = (f"data loader reshard ({'; '.join(reasons)}): restarting at the start of epoch(s) "
                            f"{epochs} with the new layout; documents of that epoch already seen may be seen again")
        log.warning("%s", self.resume_note)
        self._plan = dataclasses.replace(p, history=())
        self._cursors = [{"streams": [[e, 0, 0] for e in epochs], "pending": None, "draws": 0, "carry": []}
                         for _ in range(p.workers)]
        self._next_worker = 0
        self._delivered = 0
