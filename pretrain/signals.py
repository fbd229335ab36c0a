"""Preemption: SIGTERM/SIGUSR1 ask the run to stop; all ranks agree at a step boundary, checkpoint, exit 42.

Why a flag and not work in the handler: a handler runs between two bytecodes of whatever the rank was doing
(maybe inside a collective), so it only records the request. Why an all-reduce: SLURM may deliver the signal to
one node a little before another; if each rank checked only its own flag they would stop at different steps and
deadlock in the checkpoint's collectives.
"""
from __future__ import annotations

import signal
from types import FrameType
from typing import Protocol

# The sbatch script (slurm/pretrain.sbatch) runs `scontrol requeue` when the training exits with exactly this.
REQUEUE_EXIT_CODE = 42
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class _Reducer(Protocol):
    def all_reduce_max(self, value: float) -> float: ...


class StopRequest:
    """Installs the handlers; `requested` is this rank's flag, `signum` the signal that set it."""

    def __init__(self) -> None:
        self.signum: int | None = None

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.signum = signum

    def install(self) -> "StopRequest":
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._handle)
        return self

    def should_stop(self, env: _Reducer) -> bool:
        """Collective: True on every rank if any rank was signalled."""
        return env.all_reduce_max(1.0 if self.requested else 0.0) > 0.0
