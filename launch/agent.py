"""Run torchrun's agent in this process, forward preemption signals to the ranks, keep the ranks' exit code.

Why not `os.execv` torchrun: torchrun exits 1 whenever a rank fails, whatever the rank's exit code was, so the
training's "checkpointed after a signal, please requeue me" code (42) would never reach the sbatch script.
Running the same agent in-process (`torch.distributed.run.run`, the function behind the `torchrun` entry point)
lets us read each failed rank's exit code and exit with it.

Signals: torchrun forwards only SIGTERM/SIGINT/SIGHUP/SIGQUIT, and on those it *stops* the ranks (SIGKILL after
a grace period) and exits with a SignalException -- the opposite of "checkpoint and carry on to exit 42". SIGUSR1
is not handled at all, so its default action would kill the agent and orphan the ranks (they run in their own
sessions). And SLURM signals every process of a step at once (proctrack/linuxproc and cgroup walk the whole
tree), including a rank still importing torch, for which SIGUSR1's default action is to die.

So SIGUSR1 is *blocked* from the launcher's first line on (`launch/__main__.py`): the agent cannot die of it,
and the ranks inherit the blocked mask through fork/exec, so a notice that arrives early stays pending. Each rank's
shim (`launch/rank.py`) installs a handler and only then unblocks it. Here a thread takes the agent's own
copies with `sigwait` and re-sends them to the ranks, so the notice also reaches ranks where SLURM (or a plain
`kill` of the launcher outside SLURM) signals only the launcher. A rank may get the notice twice: handlers that
only set a flag make that harmless.

SIGTERM takes the same path: a stop request, as from `kill`, a container runtime or `scancel --signal=TERM` (which
signals the step's tasks, not srun); the ranks checkpoint and exit 42. torchrun's own handler would stop them
without one. (A bare `scancel` or a time limit also sends SIGTERM to srun, which then kills its tasks at once;
no launcher can answer that with a checkpoint, hence the sbatch header's `--signal=B:USR1@<lead>`.)

SIGINT (Ctrl-C at a terminal) takes the same path. The terminal signals only the launcher's process group (torchrun
starts each rank in a session of its own), and torchrun's handler would kill the ranks without a checkpoint; here
the ranks get it and stop as on SIGTERM (checkpoint, exit 42). A second Ctrl-C is forwarded too and the ranks exit
at once; a second one before any rank exists ends the launcher itself.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path

from pretrain.run.exits import EXIT_LOST_PEER

FORWARDED = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)


def child_pids(parent: int) -> list[int]:
    """Direct children of `parent`, read from /proc (no psutil dependency)."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:  # the process exited while we looked
            continue
        # /proc/<pid>/stat: "pid (comm) state ppid ..." -- comm may contain spaces and parentheses.
        fields = text[text.rfind(")") + 2:].split()
        if len(fields) > 1 and int(fields[1]) == parent:
            pids.append(int(stat.parent.name))
    return pids


def block_forwarded_signals() -> None:
    """Hold SIGUSR1/SIGTERM/SIGINT pending in this process and every process it starts (see the module docstring)."""
    signal.pthread_sigmask(signal.SIG_BLOCK, set(FORWARDED))


def _forward_forever() -> None:
    """Take each blocked SIGUSR1/SIGTERM/SIGINT sent to the agent and re-send it to the ranks (once they exist)."""
    while True:
        signum = signal.sigwait(set(FORWARDED))
        targets = child_pids(os.getpid())
        while not targets:  # the notice came before torchrun started the ranks: hold it until it has
            if signum in (signal.SIGINT, signal.SIGTERM) and signum in signal.sigpending():
                # a second Ctrl-C or SIGTERM (say, a rendezvous that never completes): there is nothing to save
                print(f"launch: second {signal.Signals(signum).name} before the ranks started; exiting",
                      file=sys.stderr, flush=True)
                os._exit(128 + signum)
            time.sleep(0.2)
            targets = child_pids(os.getpid())
        print(f"launch: got {signal.Signals(signum).name}, forwarding to ranks {targets}", file=sys.stderr,
              flush=True)
        for pid in targets:
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass


def exit_code_of_failures(codes: list[int]) -> int:
    """One exit code for the node: the ranks' common code when they agree, else 1 (a plain failure).

    torchrun stops the other ranks with SIGTERM the moment one rank exits non-zero. A rank that is already past
    its checkpoint and shutting down (CPython resets signal handlers to the default during finalization) dies of
    that SIGTERM: seen as [42, -15] when two ranks exit 42 a few ms apart. That -15 is the agent's own cleanup
    and says nothing about the run, so it is ignored whenever a rank reported a real exit code.
    Likewise EXIT_LOST_PEER: a rank saying "another rank died" is the consequence of the other ranks' codes
    (seen as [4, 130]: a second Ctrl-C ended one rank at once, and its peer's collective failed before the
    peer's own second Ctrl-C was handled), so the others' code is the node's.
    A rank killed by signal N otherwise reports -N; that becomes 128+N, the shell's convention.
    """
    own = [c for c in codes if c != -signal.SIGTERM]
    causes = [c for c in own if c != EXIT_LOST_PEER]
    mapped = {128 - c if c < 0 else c for c in (causes or own or codes)}
    if len(mapped) == 1:
        code = mapped.pop()
        return code if 0 < code < 256 else 1
    return 1


def quiet_agent_logs() -> None:
    """torchrun's agent logs each rank's exit ("Sending process N closing signal SIGTERM", "failed (exitcode: 42)
    ... of binary") in its own format; the launcher prints one line for the node instead (`run_torchrun`)."""
    import logging

    name = "torch.distributed.elastic"
    for logger in [logging.getLogger(name)] + [logging.getLogger(n) for n in list(logging.root.manager.loggerDict)
                                               if n.startswith(name + ".")]:
        logger.setLevel(logging.CRITICAL)


def run_torchrun(torchrun_args: list[str], *, verbose: bool = False) -> int:
    """torchrun's agent with `torchrun_args`; returns the exit code this node should report. `verbose` keeps the
    agent's own log lines."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    if not verbose:
        quiet_agent_logs()

    block_forwarded_signals()  # already done by launch/__main__.py; repeated for callers of this function
    threading.Thread(target=_forward_forever, name="launch-signal-forwarder", daemon=True).start()
    try:
        run(parse_args(torchrun_args))
    except ChildFailedError as e:
        codes = [failure.exitcode for failure in e.failures.values()]
        code = exit_code_of_failures(codes)
        print(f"launch: ranks exited with {sorted(set(codes))}; node exits {code}", file=sys.stderr, flush=True)
        return code
    except SignalException as e:
        print(f"launch: agent stopped by {e.sigval.name}; ranks were stopped", file=sys.stderr, flush=True)
        return 128 + int(e.sigval)
    return 0
