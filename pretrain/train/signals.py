"""Stopping: SIGTERM/SIGUSR1/SIGINT (Ctrl-C) ask the run to stop; all ranks agree at a step boundary, checkpoint,
exit 42. A second Ctrl-C exits at once (130), without a checkpoint: the last committed one stays.

Why a flag and not work in the handler: a handler runs between two bytecodes of whatever the rank was doing
(maybe inside a collective), so it only records the request. Why an all-reduce: SLURM may deliver the signal to
one node a little before another; if each rank checked only its own flag they would stop at different steps and
deadlock in the checkpoint's collectives.

Ctrl-C is treated like SIGTERM because Python's default (KeyboardInterrupt wherever the rank happens to be) prints
a traceback per rank and per loader worker and loses the steps since the last checkpoint. On one node the ranks
should run under `python -m launch`, which forwards Ctrl-C and SIGUSR1 to them (torchrun's own agent answers
Ctrl-C by killing the ranks, and dies of SIGUSR1, leaving them orphaned).
"""
from __future__ import annotations

import os
import signal
from types import FrameType
from typing import Protocol

from pretrain.console import say_from_signal_handler
from pretrain.run.exits import EXIT_INTERRUPTED

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


class _Reducer(Protocol):
    def all_reduce_max(self, value: float) -> float: ...


class StopRequest:
    """Installs the handlers; `requested` is this rank's flag, `signum` the signal that set it."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._pid = os.getpid()

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if os.getpid() != self._pid:  # a forked loader worker inherited the handler: the rank itself decides
            return
        if signum == signal.SIGINT:
            if self.signum == signal.SIGINT:
                say_from_signal_handler(f"second interrupt: exiting now without a checkpoint "
                                        f"(exit {EXIT_INTERRUPTED})")
                os._exit(EXIT_INTERRUPTED)
            say_from_signal_handler("interrupt: stopping after the current step, with a checkpoint (Ctrl-C again "
                                    "to exit at once)")
        if self.signum is None or signum == signal.SIGINT:
            self.signum = signum

    def install(self) -> "StopRequest":
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._handle)
        return self

    def settle(self) -> None:
        """The run's outcome is decided (done, or checkpointed for a requeue): from here to process exit the stop
        signals are ignored. CPython puts the default handlers back while the interpreter shuts down (the default
        for SIGUSR1 and SIGTERM is to die), so a notice landing after `done:` killed ranks whose work was saved,
        and the job ended FAILED; an ignored signal stays ignored through shutdown."""
        for sig in STOP_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)

    def should_stop(self, env: _Reducer) -> bool:
        """Collective: True on every rank if any rank was signalled."""
        return env.all_reduce_max(1.0 if self.requested else 0.0) > 0.0
