"""`python -m launch.rank <training command>`: what torchrun starts as each rank; runs the command in-process.

Why a shim at all: SLURM delivers a step signal to *every* process of the step (proctrack/linuxproc and
proctrack/cgroup both signal the whole process tree), so a rank gets SIGUSR1 whether or not anybody forwards it.
A rank that is still importing torch/DeepSpeed has not installed its handler yet, and the default action of
SIGUSR1 is to terminate: a preemption notice in the first seconds of a run killed the job instead of requeueing
it (seen with the stand-in in tests/slurm). The same holds for a Ctrl-C the launcher forwards (SIGINT: a
KeyboardInterrupt traceback in the middle of an import), and for SIGTERM. The launcher starts ranks with all three
blocked (pending, not lost); this shim installs a handler, unblocks them, remembers a notice that arrived early,
and re-delivers it as soon as the training has installed its own handler. After that the shim is out of the way: the training's
handler is the only one, and the training's exit code is the process's exit code.

Command forms, as torchrun takes them: `-m package.module args...` or `path/to/script.py args...`.
"""
from __future__ import annotations

import os
import runpy
import signal
import sys
from types import FrameType

# The preemption notice, a stop request and Ctrl-C: the launcher forwards all three. (torchrun's agent also sends
# SIGTERM to the surviving ranks when one fails; held here, it still stops them, and SIGKILL follows its grace time.)
DEFERRED = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)
_pending: set[int] = set()


def _remember(signum: int, _frame: FrameType | None) -> None:
    if signum == signal.SIGINT and signum in _pending:  # Ctrl-C twice before the training could take it: die now
        _install(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
    _pending.add(signum)


_install = signal.signal


def _install_then_redeliver(signum, handler):
    """`signal.signal` for the training: once it handles a deferred signal, a notice held so far is re-sent at
    once, so the training sees it before it runs a step (polling for the new handler would let a step slip by)."""
    previous = _install(signum, handler)
    if signum in DEFERRED and handler is not _remember and signum in _pending:
        _pending.discard(signum)
        os.kill(os.getpid(), signum)  # handled now: Python runs the handler at the next bytecode boundary
    return previous


def main() -> None:
    for signum in DEFERRED:
        signal.signal(signum, _remember)
    signal.signal = _install_then_redeliver  # the training's own handler installation triggers the re-delivery
    signal.pthread_sigmask(signal.SIG_UNBLOCK, set(DEFERRED))  # a notice pending since startup lands in _remember

    command = sys.argv[1:]
    if not command:
        sys.exit("launch.rank: no training command")
    if command[0] == "-m":
        if len(command) < 2:
            sys.exit("launch.rank: -m needs a module name")
        sys.argv = [command[1], *command[2:]]
        runpy.run_module(command[1], run_name="__main__", alter_sys=True)
    else:
        script = command[0]
        sys.argv = command
        sys.path.insert(0, os.path.dirname(os.path.abspath(script)))  # what `python script.py` does
        runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
