"""The TokenLoader's saved state: checking it, merging every DP rank's state, re-splitting it for a new layout.

A per-rank state (`TokenLoader.state_dict()`, JSON) holds, per worker of that rank, a *cursor*:
  streams  per source, the position (epoch, segment, offset) of the next sample that worker's slot consumes;
  pending  the document the packer was in the middle of: {source, pos, taken} (pos = where it was read);
  carry    documents handed over by a layout change, still to be packed first: [[source, shard, index, taken]];
  draws    how many mixture draws the slot has made,
plus the slot layout (dp_size, num_workers), the plan's change history (partition.Change), the dataset
fingerprint, and what that fingerprint was taken of (`dataset`: per source its shards' names, counts, sizes and
sha256 prefixes; the mixture's token shares), so that a resume on changed data can say what changed (shards added,
removed or modified, by name; other weights) instead of only that the hash differs. States saved before `dataset`
was recorded still load; a change is then reported by fingerprint only. A *merged* state (`merge_states`) is
every DP rank's state side by side: it is what a loader with another dp_size or worker count needs, because its
share of the rest of the epoch depends on all old slots.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from data_pipeline.errors import LoaderStateError
from data_pipeline.partition import Change, Partition
from data_pipeline.shardset import ShardSet

STATE_FORMAT = "token-loader-state"
STATE_VERSION = 2  # 2: + history and carry (layout changes); version 1 states (no layout change) still load
MERGED = "merged"


def workers_of(state: dict) -> int:
    """Slots per rank: num_workers 0 and 1 both mean one slot."""
    return max(int(state["num_workers"]), 1)


def check_state(state: object) -> dict:
    """A per-rank or merged state, checked for shape; LoaderStateError (one line) otherwise."""
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise LoaderStateError("loader state: not a TokenLoader state_dict")
    if state.get("version") not in (1, STATE_VERSION):
        raise LoaderStateError(f"loader state: version {state.get('version')} is not supported "
                               f"(this code reads 1 and {STATE_VERSION})")
    missing = [k for k in ("fingerprint", "dp_size", "num_workers", "seed", "shuffle_buffer") if k not in state]
    if state.get("kind") == MERGED:
        missing += [] if "ranks" in state else ["ranks"]
    else:
        missing += [k for k in ("dp_rank", "cursors", "next_worker") if k not in state]
        if not missing and len(state["cursors"]) != workers_of(state):
            raise LoaderStateError(f"loader state: {len(state['cursors'])} worker cursors for num_workers "
                                   f"{state['num_workers']}")
    if missing:
        raise LoaderStateError(f"loader state: missing key(s) {missing}")
    return state


def dataset_of(sets: Sequence[ShardSet], shares: Sequence[float]) -> dict:
    """What a state records of its data (JSON): per source its spec, tokenizer and token dtype, and each shard as
    [name, samples, tokens, bytes, first 16 hex digits of its sha256]; the mixture's token shares. About 60 bytes
    a shard: a 10,000-shard corpus adds 0.6 MB to each rank file."""
    return {"sources": [{"spec": ss.spec, "tokenizer": ss.manifest.tokenizer.identity[:16],
                         "dtype": ss.manifest.dtype,
                         "shards": [[s.name, s.samples, s.tokens, s.bytes, s.sha256[:16]] for s in ss.shards]}
                        for ss in sets],
            "weights": [round(w, 12) for w in shares]}


_SHARD_FIELDS = ("sample count", "token count", "size", "sha256")  # the entries after the name, in order


def _names(names: list[str], most: int = 3) -> str:
    return ", ".join(names[:most]) + (f" and {len(names) - most} more" if len(names) > most else "")


def _source_changes(old: dict, new: dict) -> list[str]:
    """The differences between two sources' records, each a few words naming the shards."""
    before = {row[0]: list(row[1:]) for row in old["shards"]}
    after = {row[0]: list(row[1:]) for row in new["shards"]}
    out = []
    for key in ("tokenizer", "dtype"):
        if old.get(key) != new.get(key):
            out.append(f"{key} {old.get(key)} -> {new.get(key)}")
    if added := [n for n in after if n not in before]:
        out.append(f"shards added: {_names(added)}")
    if removed := [n for n in before if n not in after]:
        out.append(f"shards removed: {_names(removed)}")
    modified = []
    for name in (n for n in after if n in before and after[n] != before[n]):
        fields = [f for f, a, b in zip(_SHARD_FIELDS, before[name], after[name]) if a != b]
        modified.append(f"{name} ({', '.join(fields)} differ{'s' if len(fields) == 1 else ''})")
    if modified:
        out.append(f"shards modified: {_names(modified)}")
    if not out and list(before) != list(after):
        out.append("shard order changed")
    return out


def dataset_changes(saved: object, now: dict) -> str | None:
    """What differs between the data a state was saved on (its `dataset` record) and `now` (`dataset_of`), in one
    line; None when the state has no record (saved by an older version) or the record shows no difference."""
    try:
        old_sources, new_sources = saved["sources"], now["sources"]
        if len(old_sources) != len(new_sources):
            return (f"sources {len(old_sources)} -> {len(new_sources)} "
                    f"({', '.join(s['spec'] for s in old_sources)} -> {', '.join(s['spec'] for s in new_sources)})")
        parts = []
        for i, (old, new) in enumerate(zip(old_sources, new_sources)):
            where = f"source {i} ({new['spec']}): " if len(new_sources) > 1 else ""
            parts += [where + change for change in _source_changes(old, new)]
        if saved["weights"] != now["weights"]:
            parts.append(f"mixture weights {_shares(saved['weights'])} -> {_shares(now['weights'])}")
    except (KeyError, TypeError, ValueError, IndexError):
        return None  # no record, or not one this code wrote: the caller says what it knows without it
    return "; ".join(parts) or None


def _shares(weights: list) -> str:
    return "[" + ", ".join(f"{float(w):.4g}" for w in weights) + "]"


def history_of(state: dict) -> tuple[Change, ...]:
    return tuple(Change.from_json(c) for c in state.get("history", []))


def plain_cursor(cursor: dict | None) -> dict | None:
    """A cursor with only JSON types, so a state survives json.dumps/loads (and torch.save) unchanged."""
    if cursor is None:
        return None
    pend = cursor["pending"]
    return {"streams": [[int(x) for x in pos] for pos in cursor["streams"]],
            "pending": None if pend is None else {"source": int(pend["source"]),
                                                  "pos": [int(x) for x in pend["pos"]],
                                                  "taken": int(pend["taken"])},
            "draws": int(cursor["draws"]),
            "carry": [[int(x) for x in c] for c in cursor.get("carry") or []]}


def merge_states(states: Sequence[dict]) -> dict:
    """Every DP rank's loader state (in any order) -> one merged state that any layout can resume from.

    `states` is typically `[torch.load(f)["loader"] for f in step_dir.glob("rank_*.pt")]`: the TP/PP peers of
    a DP rank hold identical states and may all be passed. Refused (LoaderStateError, one line) when the
    states disagree on dataset, seed, shuffle buffer, layout or history, when two states of one DP rank
    differ, or when a DP rank is missing. A merged state passed in is unpacked, so merging is idempotent.
    """
    flat: list[dict] = []
    for state in states:
        check_state(state)
        flat.extend(state["ranks"] if state.get("kind") == MERGED else [state])
    if not flat:
        raise LoaderStateError("loader state: no states to merge")
    first = flat[0]
    for state in flat[1:]:
        for key, get in (("fingerprint", lambda s: s["fingerprint"]), ("seed", lambda s: s["seed"]),
                         ("shuffle_buffer", lambda s: s["shuffle_buffer"]), ("dp_size", lambda s: s["dp_size"]),
                         ("workers", workers_of), ("history", lambda s: s.get("history", []))):
            if get(state) != get(first):
                raise LoaderStateError(f"loader states of dp ranks {first['dp_rank']} and {state['dp_rank']} "
                                       f"disagree on {key}: they are not from one checkpoint")
    by_rank: dict[int, dict] = {}
    for state in flat:
        r = int(state["dp_rank"])
        if r in by_rank and _progress(by_rank[r]) != _progress(state):
            raise LoaderStateError(f"loader state: two different states for dp rank {r} (the TP/PP peers of a DP "
                                   "rank consume the same batches; are these files from one checkpoint?)")
        by_rank[r] = state
    dp_size = int(first["dp_size"])
    missing = sorted(set(range(dp_size)) - set(by_rank))
    if missing or len(by_rank) != dp_size:
        raise LoaderStateError(f"loader state: the states of dp rank(s) {missing} of {dp_size} are missing")
    return {"format": STATE_FORMAT, "version": STATE_VERSION, "kind": MERGED, "fingerprint": first["fingerprint"],
            "seed": first["seed"], "shuffle_buffer": first["shuffle_buffer"], "dp_size": dp_size,
            "num_workers": first["num_workers"], "history": first.get("history", []),
            "ranks": [by_rank[r] for r in range(dp_size)]}


def _progress(state: dict) -> tuple:
    return ([plain_cursor(c) for c in state["cursors"]], state["next_worker"])


@dataclass(frozen=True)
class Resplit:
    """One new rank's start after a layout change."""
    history: tuple[Change, ...]   # the plan chain the new layout reads under
    cursors: list[dict]           # one per worker of the new rank
    message: str                  # one line for the log: what was re-split, from which layout to which


def resplit(merged: dict, samples: list[list[int]], *, dp_rank: int, dp_size: int, workers: int,
            epochs: int | None) -> Resplit:
    """Where each worker of new rank `dp_rank` (of dp_size x workers) starts, from all old ranks' cursors.

    Exact: the samples no old slot consumed are re-cut over the new slots (partition.py), and the documents the
    old packers were in the middle of (and carries not yet packed) go, each whole remaining tail once, to the new
    slots round-robin, to be packed before anything else.
    """
    n_src = len(samples)
    old_dp, old_w = int(merged["dp_size"]), workers_of(merged)
    old_history = history_of(merged)
    old = Partition(samples, merged["seed"], merged["shuffle_buffer"], old_history, old_dp * old_w)
    cursors = []
    for rank in merged["ranks"]:
        for c in rank["cursors"]:
            if c is None and old_history:
                raise LoaderStateError("loader state: a worker without a cursor after a layout change")
            cursors.append(plain_cursor(c) or {"streams": [[0, 0, 0]] * n_src, "pending": None, "draws": 0})
    if any(len(c["streams"]) != n_src for c in cursors):
        raise LoaderStateError(f"loader state: cursors for another number of sources than {n_src}")
    change = Change(old_dp, old_w, tuple(tuple(tuple(c["streams"][s]) for s in range(n_src)) for c in cursors))
    # the old chain matters only while some new position can still reach an epoch it re-split
    keep = bool(old_history) and any(change.epochs(s)[0] <= old_history[-1].epochs(s)[1] for s in range(n_src))
    history = (old_history if keep else ()) + (change,)

    carries = []
    for slot, c in enumerate(cursors):
        carries.extend(c.get("carry", []))
        pend = c["pending"]
        if pend is not None:
            shard, index = old.sample_at(pend["source"], tuple(pend["pos"]), slot)
            carries.append([pend["source"], shard, index, pend["taken"]])
    new_slots = dp_size * workers
    draws = max(c["draws"] for c in cursors)
    starts = []
    for w in range(workers):
        slot = dp_rank * workers + w
        starts.append({"streams": [[change.epochs(s)[0], 0, 0] for s in range(n_src)], "pending": None,
                       "draws": draws, "carry": [list(x) for x in carries[slot::new_slots]]})

    new = Partition(samples, merged["seed"], merged["shuffle_buffer"], history, new_slots)
    parts = []
    for s in range(n_src):
        first, last = change.epochs(s)
        last = last if epochs is None else min(last, epochs - 1)
        counts = [f"{new.remaining(s, e)} of epoch {e}" for e in range(first, last + 1)] or ["none"]
        parts.append(("" if n_src == 1 else f"source {s}: ") + ", ".join(counts))
    message = (f"loader: re-partitioning the unconsumed samples ({'; '.join(parts)}) and {len(carries)} partly "
               f"packed document(s) from dp {old_dp} x {old_w} worker(s) to dp {dp_size} x {workers} worker(s); "
               "later epochs use the normal split")
    return Resplit(history, starts, message)
