"""Which rank is slow, while nothing has failed yet.

On every logged step (`train.log_every`) each rank measures its own compute time: the step's wall time less the
time its DeepSpeed collectives took, waiting for the slowest peer included (DeepSpeed's own comms logger times
each one, synchronising the device after it; on that step only, so the other steps pay nothing). The ranks'
times are gathered: the slowest rank, its host, its ratio to the median and the median go to metrics.jsonl and
MLflow (`straggler_rank`, `straggler_host`, `straggler_ratio`, `compute_median_s`), and a rank that is at least
`train.straggler_ratio` times the median (and STRAGGLER_MIN_S slower: below that it is noise) on STREAK logged
steps in a row is named in one warning line, once per streak. What is not excluded: the tensor-parallel
collectives inside the layers (megatron-core calls torch.distributed itself), so a slow rank's TP peers look as
slow as it does; the data-parallel, ZeRO and pipeline collectives are DeepSpeed's.
"""
from __future__ import annotations

import contextlib
import socket
import statistics
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.distributed as dist

from pretrain.console import say
from pretrain.run.distributed import DistEnv

STREAK = 3  # logged steps in a row before a rank is named
STRAGGLER_MIN_S = 0.1  # a rank this much slower than the median, at least, to count


@dataclass
class CollectiveTime:
    seconds: float = 0.0


@contextlib.contextmanager
def timed_collectives(enabled: bool) -> Iterator[CollectiveTime]:
    """The seconds DeepSpeed's collectives take inside the block (DeepSpeed's comms logger, on for the block)."""
    out = CollectiveTime()
    if not enabled:
        yield out
        return
    from deepspeed.comm.comm import comms_logger

    comms_logger.comms_dict.clear()
    comms_logger.enabled, comms_logger.prof_all = True, True
    try:
        yield out
    finally:
        comms_logger.enabled = False
        # {op: {message size: [count, [latency ms, ...], algbw, busbw]}}
        out.seconds = sum(sum(record[1]) for sizes in comms_logger.comms_dict.values()
                          for record in sizes.values()) / 1000.0
        comms_logger.comms_dict.clear()


@dataclass(frozen=True)
class Straggler:
    rank: int
    host: str
    ratio: float  # its compute time over the median rank's
    median_s: float


class StragglerWatch:
    """Collective at measured steps: every rank calls `observe` with the same step."""

    def __init__(self, env: DistEnv, every: int, ratio: float) -> None:
        self.env, self.every, self.ratio = env, every, ratio
        hosts: list[str | None] = [None] * env.world_size
        dist.all_gather_object(hosts, socket.gethostname())
        self.hosts = [h or "?" for h in hosts]
        self.streak_rank, self.streak = -1, 0

    def measures(self, step: int) -> bool:
        return self.env.world_size > 1 and step % self.every == 0

    def observe(self, step: int, compute_s: float | None) -> Straggler | None:
        """The slowest rank of this measured step (rank 0; None elsewhere and on unmeasured steps)."""
        if compute_s is None:
            return None
        mine = torch.tensor([compute_s], dtype=torch.float64, device=self.env.comm_device)
        times = [torch.empty_like(mine) for _ in range(self.env.world_size)]
        dist.all_gather(times, mine)
        if self.env.rank != 0:
            return None
        seconds = [float(t) for t in times]
        median = statistics.median(seconds)
        slowest = max(range(len(seconds)), key=seconds.__getitem__)
        found = Straggler(slowest, self.hosts[slowest], seconds[slowest] / median if median > 0 else 1.0, median)
        self._warn(step, found, seconds[slowest] - median)
        return found

    def _warn(self, step: int, found: Straggler, behind_s: float) -> None:
        slow = found.ratio >= self.ratio and behind_s >= STRAGGLER_MIN_S
        if not slow:
            self.streak_rank, self.streak = -1, 0
            return
        self.streak = self.streak + 1 if found.rank == self.streak_rank else 1
        self.streak_rank = found.rank
        if self.streak == STREAK:
            say(f"straggler: rank {found.rank} on {found.host} computes {found.ratio:.2f}x the median rank's time "
                f"({found.median_s * found.ratio:.3f} s vs {found.median_s:.3f} s) on {STREAK} logged steps in a row, "
                f"up to step {step} (train.straggler_ratio={self.ratio:g})")
