"""Which slot reads which samples in each epoch, across changes of DP size or worker count.

A *plan* gives every sample of every epoch of a source to exactly one slot (slot = dp_rank * workers + worker)
as a list of segments, each read in a seeded shuffle-buffer order (plan.py). A slot's *position* per source is
(epoch, segment, offset): everything before it has been pulled into the slot's packer (*consumed*); samples
merely sitting in a shuffle buffer are not consumed, since the buffer is recomputed from indices.

Plan 0 is plan.py's normal split. When the layout changes while the old slots stand at positions P (a
`Change`: the old dp_size x workers and P for every old slot), the next plan is:
  - in each epoch some old slot had not finished ([min, max] of P's epochs, per source): the *remainder*,
    i.e. the samples of that epoch not consumed at P, in the old plan's order (old slot by old slot, segment by
    segment, a partly read segment keeping its unread samples in tar order), cut into new_dp x new_workers
    contiguous ranges of (almost) equal size;
  - in every later epoch: the normal split over the new slots.
So each sample of each epoch is consumed by exactly one slot over all the plans. Changes chain (a second
change inside a remainder epoch re-splits the remainder of the remainder); the chain is what a loader state
carries, and it is dropped at the next change once no position can reach an epoch it governs.
"""
from __future__ import annotations

import bisect
import itertools
from dataclasses import dataclass

from data_pipeline.plan import Segment, buffer_order, slot_segments

Position = tuple[int, int, int]  # (epoch, segment, offset) of the next sample a slot will consume


@dataclass(frozen=True)
class Change:
    """A layout that was left: its dp_size x workers and each of its slots' positions (per source) then."""
    dp_size: int
    workers: int
    positions: tuple[tuple[Position, ...], ...]  # [old slot][source]

    @property
    def num_slots(self) -> int:
        return self.dp_size * self.workers

    def epochs(self, source: int) -> tuple[int, int]:
        """(first, last) epoch of `source` in which some old slot still had samples to read."""
        seen = [slot[source][0] for slot in self.positions]
        return min(seen), max(seen)

    def to_json(self) -> dict:
        return {"dp_size": self.dp_size, "workers": self.workers,
                "positions": [[list(p) for p in slot] for slot in self.positions]}

    @classmethod
    def from_json(cls, d: dict) -> Change:
        return cls(int(d["dp_size"]), int(d["workers"]),
                   tuple(tuple(tuple(int(x) for x in p) for p in slot) for slot in d["positions"]))


class Partition:
    """The segments of any slot, source and epoch under the plan that follows `history` (oldest change first).

    Level j is the plan in force after j changes; the current one is level len(history), with `num_slots`.
    Pure arithmetic on the manifests' sample counts, so every rank and worker computes it alone.
    """

    def __init__(self, samples: list[list[int]], seed: int, shuffle_buffer: int, history: tuple[Change, ...],
                 num_slots: int):
        self.samples, self.seed, self.shuffle_buffer, self.history = samples, seed, shuffle_buffer, history
        self._slots = [c.num_slots for c in history] + [num_slots]
        self._remainders: dict[tuple[int, int, int], list[list[Segment]]] = {}

    @property
    def level(self) -> int:
        return len(self.history)

    def segments(self, source: int, epoch: int, slot: int, level: int | None = None) -> list[Segment]:
        """The segments `slot` reads in `epoch` of `source`, in reading order."""
        level = self.level if level is None else level
        if level > 0:
            first, last = self.history[level - 1].epochs(source)
            if epoch < first:
                return []  # consumed in full before the change
            if epoch <= last:
                return self._remainder(level, source, epoch)[slot]
        return slot_segments(self.samples[source], self.seed, source, epoch, slot, self._slots[level])

    def order(self, source: int, epoch: int, slot: int, segment: int, size: int) -> list[int]:
        """The shuffle-buffer order of a segment (indices into it), the same for every plan level."""
        return buffer_order(size, self.shuffle_buffer, self.seed, source, epoch, slot, segment).tolist()

    def sample_at(self, source: int, pos: Position, slot: int, level: int | None = None) -> tuple[int, int]:
        """(shard, tar index) of the sample at `pos` of `slot`."""
        epoch, g, offset = pos
        seg = self.segments(source, epoch, slot, level)[g]
        return seg.shard, seg.index(self.order(source, epoch, slot, g, seg.size)[offset])

    def remaining(self, source: int, epoch: int) -> int:
        """Samples of `epoch` the current plan re-splits (only meaningful for an epoch of the last change)."""
        return sum(seg.size for segs in self._remainder(self.level, source, epoch) for seg in segs)

    def _remainder(self, level: int, source: int, epoch: int) -> list[list[Segment]]:
        key = (level, source, epoch)
        if key not in self._remainders:
            pieces = []
            for old_slot, positions in enumerate(self.history[level - 1].positions):
                e, g0, offset = positions[source]
                if e > epoch:
                    continue  # that slot had finished this epoch
                for g, seg in enumerate(self.segments(source, epoch, old_slot, level - 1)):
                    if e == epoch and g < g0:
                        continue
                    if e == epoch and g == g0 and offset:
                        done = set(self.order(source, epoch, old_slot, g, seg.size)[:offset])
                        left = [k for k in range(seg.size) if k not in done]
                        if not left:
                            continue
                        seg = seg.take(left)
                    pieces.append(seg)
            self._remainders[key] = _cut(pieces, self._slots[level])
        return self._remainders[key]


def _cut(pieces: list[Segment], num_slots: int) -> list[list[Segment]]:
    """Split the concatenated pieces into num_slots contiguous ranges [t*N//S, (t+1)*N//S)."""
    ends = list(itertools.accumulate(p.size for p in pieces))  # ends[i]: one past piece i's last sample
    total = ends[-1] if ends else 0
    out = []
    for t in range(num_slots):
        lo, hi = t * total // num_slots, (t + 1) * total // num_slots
        segs = []
        i = bisect.bisect_right(ends, lo)  # the piece holding sample `lo`
        while lo < hi:
            start = ends[i] - pieces[i].size
            b = min(hi, ends[i])
            segs.append(pieces[i].slice(lo - start, b - start))
            lo, i = b, i + 1
        out.append(segs)
    return out
