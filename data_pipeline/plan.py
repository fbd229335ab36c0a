"""Who reads which sample when: the deterministic epoch plan behind the loader.

All of it is pure arithmetic on (seed, epoch, manifest sample counts, slot), so every DP rank and every worker
computes its share independently, with no communication, and a resume can jump straight to any position.

- Shard order: a seeded permutation of the source's shards per epoch (seed, source, epoch).
- Split: the epoch's samples, in that shard order, form one sequence of N samples; slot s of S
  (slot = dp_rank * workers_per_rank + worker) takes the contiguous range [s*N//S, (s+1)*N//S). Every sample is
  read by exactly one slot per epoch, whatever N, S or the shard count; a shard may be split between two slots.
- In-shard shuffle: within each (shard, range) segment, the order a streaming shuffle buffer of size B would
  produce. The permutation is computed on indices, without reading data, so a reader positioned at offset k
  of a segment knows exactly which samples were already emitted (perm[:k]) and which are in the buffer.

This is the plan of a loader that has always had one layout; partition.py builds on it the plan that
follows a change of DP size or worker count (the unconsumed rest of the epoch, re-split).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from data_pipeline.errors import DataError


@dataclass(frozen=True)
class Segment:
    """Samples of one shard read back to back by one slot: all of [start, stop), or only `members` of it.

    `members` (ascending tar indices) appears only after a layout change, when part of a shard range was
    already consumed (see partition.py); the normal split always reads whole ranges.
    """
    shard: int  # index into the source's shard list
    start: int  # first sample (in tar order) of the range
    stop: int   # one past the last sample
    members: tuple[int, ...] | None = None

    @property
    def size(self) -> int:
        return self.stop - self.start if self.members is None else len(self.members)

    def index(self, k: int) -> int:
        """Tar index of the segment's k-th sample (in tar order)."""
        return self.start + k if self.members is None else self.members[k]

    def take(self, ks: list[int]) -> Segment:
        """The segment of this one's samples number `ks` (ascending)."""
        return make_segment(self.shard, [self.index(k) for k in ks])

    def slice(self, a: int, b: int) -> Segment:
        if self.members is None:
            return Segment(self.shard, self.start + a, self.start + b)
        return make_segment(self.shard, list(self.members[a:b]))


def make_segment(shard: int, indices: list[int]) -> Segment:
    """A segment reading the (ascending, non-empty) tar indices; a plain range when they are contiguous."""
    if indices[-1] - indices[0] + 1 == len(indices):
        return Segment(shard, indices[0], indices[-1] + 1)
    return Segment(shard, indices[0], indices[-1] + 1, tuple(indices))


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng([int(k) & 0xFFFFFFFF for k in key])


def num_slots(dp_size: int, num_workers: int) -> int:
    """Readers of one epoch: each DP rank's max(num_workers, 1) loader workers."""
    return dp_size * max(num_workers, 1)


def check_split(where: str, samples: int, dp_size: int, num_workers: int) -> None:
    """Every slot must get at least one document of the epoch: with N < S samples some slot's range
    [s*N//S, (s+1)*N//S) is empty and it would have nothing to read. DataError (one line) otherwise.

    The loader calls this when it is built, `pretrain.run.resolved.resolve_run` before anything starts (and in
    `--dry-run`), so a corpus too small for the layout fails in seconds, not at the first step."""
    workers = max(num_workers, 1)
    if samples < num_slots(dp_size, num_workers):
        raise DataError(f"{where}: {samples} documents cannot be split over dp_size {dp_size} x {workers} "
                        "worker(s); use fewer workers or more data")


def shard_order(num_shards: int, seed: int, source: int, epoch: int) -> np.ndarray:
    return _rng(seed, 0x5A4D, source, epoch).permutation(num_shards)


def slot_segments(samples: list[int], seed: int, source: int, epoch: int, slot: int,
                  num_slots: int) -> list[Segment]:
    """The segments slot `slot` reads in epoch `epoch`, in reading order."""
    order = shard_order(len(samples), seed, source, epoch)
    total = sum(samples)
    lo, hi = slot * total // num_slots, (slot + 1) * total // num_slots
    segments, offset = [], 0
    for shard in order:
        n = samples[shard]
        a, b = max(lo, offset), min(hi, offset + n)
        if a < b:
            segments.append(Segment(int(shard), a - offset, b - offset))
        offset += n
        if offset >= hi:
            break
    return segments


def buffer_order(n: int, buffer: int, seed: int, source: int, epoch: int, slot: int, segment: int) -> np.ndarray:
    """Permutation of range(n) emitted by a shuffle buffer of `buffer` samples (fill, then for each new sample
    emit a random buffered one and put the new one in its place; drain in random order at the end)."""
    if buffer <= 1 or n <= 1:
        return np.arange(n)
    rng = _rng(seed, 0xB0F, source, epoch, slot, segment)
    size = min(buffer, n)
    picks = rng.integers(0, size, size=max(n - size, 0)).tolist()
    buf = list(range(size))
    out = []
    for i, j in zip(range(size, n), picks):
        out.append(buf[j])
        buf[j] = i
    tail = rng.permutation(size)
    out.extend(buf[k] for k in tail)
    return np.asarray(out, dtype=np.int64)


def mixture_draws(seed: int, slot: int, block: int, size: int = 4096) -> np.ndarray:
    """Uniform numbers for mixture draws [block*size, (block+1)*size) of a slot: replayable from the draw count."""
    return _rng(seed, 0x313C, slot, block).random(size)
