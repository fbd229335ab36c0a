"""When no step completes in time: every rank's stacks on disk, the ranks that are not where the others wait named
in one line, and an exit that asks to be requeued, before a collective's timeout ends the run without a word.

A watchdog thread on every rank watches the time since the last sign of progress: a completed step, a save, a
rollback, and inside long phases each evaluation forward and each checkpoint file written
(`pretrain.run.progress.progress()`). Past `train.hang_timeout_s` (default
20 x the median step time, at least HANG_FLOOR_S, below `train.collective_timeout_s`) each rank writes
`<checkpoint.dir>/hangs/<stamp>-step_<n>/rank_<r>.txt`: what it was doing (the step, how long without progress,
where its main thread is: in which collective, called from where, or in none) and the Python stacks of all its
threads (`faulthandler`, which reads them without the GIL holder's help); on CUDA also torch's NCCL flight
recorder (`rank_<r>.nccl_trace.pkl`: every rank's last collectives with their sequence numbers). Rank 0 waits a
moment for the others' files and writes `summary.txt`: the one line that names the rank(s) not in the collective
the others wait in. Every rank then exits EXIT_HUNG (43), which slurm/pretrain.sbatch requeues (bounded); the
relaunch resumes from the last checkpoint. The watchdog is armed after the launch's first step, so start-up
(compilation, the first collective's connection set-up) is not judged by steps it has not yet timed.
"""
from __future__ import annotations

import faulthandler
import os
import re
import socket
import statistics
import sys
import threading
import time
import traceback
from collections import deque
from pathlib import Path
from typing import Any

from pretrain.console import say
from pretrain.run.exits import EXIT_HUNG
from pretrain.run.paths import HANG_SUMMARY, HANGS_DIR, hang_dir_name, hang_stack_file
from pretrain.run.progress import forget, listen
from pretrain.train.hooks import Observer, StepReport

HANG_FLOOR_S = 300.0  # the derived timeout's least: a slow save, eval or data stall is not a hang
STEP_MULTIPLE = 20  # the derived timeout: this many median steps
PEERS_WAIT_S = 10.0  # how long rank 0 waits for the other ranks' stacks before summarising
_COLLECTIVE_FILES = ("torch/distributed/", "deepspeed/comm/", "deepspeed/runtime/pipe/p2p.py")

class HangWatchdog(Observer):
    def __init__(self, run_dir: Path, rank: int, world: int, stamp: str, timeout_s: float | None,
                 collective_timeout_s: float, poll_s: float = 1.0) -> None:
        self.run_dir, self.rank, self.world, self.stamp = Path(run_dir), rank, world, stamp
        self.fixed = timeout_s
        self.ceiling = 0.9 * collective_timeout_s
        self.poll_s = min(poll_s, (timeout_s or HANG_FLOOR_S) / 5)
        self.step = 0
        self.last = time.monotonic()
        self.steps: deque[float] = deque(maxlen=50)  # recent step intervals, for the derived timeout
        self.armed = False
        self.main = threading.main_thread().ident
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="hang-watchdog", daemon=True)
        self._thread.start()
        listen(self.beat)  # pretrain.run.progress.progress() from long phases restarts the clock

    # ----------------------------------------------------------------------------------- the loop's side

    def beat(self) -> None:
        self.last = time.monotonic()

    def before_step(self, step: int) -> None:
        self.step = step

    def after_step(self, report: StepReport) -> None:
        now = time.monotonic()
        if self.armed:
            self.steps.append(now - self.last)
        self.last, self.armed = now, True

    def after_save(self, step: int) -> None:
        self.beat()

    def after_rollback(self, record: dict[str, Any]) -> None:
        self.beat()

    def close(self) -> None:
        self._stop.set()
        forget(self.beat)

    @property
    def timeout_s(self) -> float:
        if self.fixed is not None:
            return self.fixed
        median = statistics.median(self.steps) if self.steps else 0.0
        return min(max(HANG_FLOOR_S, STEP_MULTIPLE * median), self.ceiling)

    # ------------------------------------------------------------------------------------- the thread

    def _watch(self) -> None:
        while not self._stop.wait(self.poll_s):
            waited = time.monotonic() - self.last
            if self.armed and waited > self.timeout_s:
                self._fire(waited)
                return

    def _fire(self, waited: float) -> None:
        out = self.run_dir / HANGS_DIR / hang_dir_name(self.stamp, self.step)
        out.mkdir(parents=True, exist_ok=True)
        where = main_thread_state(self.main)
        path = out / hang_stack_file(self.rank)
        tmp = path.with_suffix(".tmp")
        with open(tmp, "w") as f:
            f.write(f"rank {self.rank} of {self.world} on {socket.gethostname()} pid {os.getpid()}\n"
                    f"step {self.step}: no progress for {waited:.1f} s (timeout {self.timeout_s:.1f} s)\n"
                    f"main thread: {where}\nmain thread id: 0x{self.main or 0:016x} (its stack is below)\n\n")
            f.flush()
            faulthandler.dump_traceback(f, all_threads=True)
        os.replace(tmp, path)
        _nccl_flight_record(out, self.rank)
        if self.rank == 0:
            line = summarise(out, self.world, self.step)
            say(f"{line}; stacks in {out}; exit {EXIT_HUNG} (requeue: resumes from the last checkpoint)")
        else:
            say(f"rank {self.rank}: no step for {waited:.0f} s; stacks in {path}; exit {EXIT_HUNG}")
            # Stay until rank 0 has read every rank's file: the launcher stops the other ranks once one exits.
            deadline = time.monotonic() + PEERS_WAIT_S + 2
            while not (out / HANG_SUMMARY).exists() and time.monotonic() < deadline:
                time.sleep(0.2)
        sys.stderr.flush()
        os._exit(EXIT_HUNG)  # the main thread is stuck in a collective or a stall: nothing can unwind it


def main_thread_state(ident: int | None) -> str:
    """'in all_reduce (torch/distributed/distributed_c10d.py) from pretrain/train/engine.py:152 in _train_plain',
    or 'not in a collective: at pretrain/train/faults.py:40 in before_step'."""
    frame = sys._current_frames().get(ident) if ident is not None else None
    if frame is None:
        return "gone"
    stack = traceback.extract_stack(frame)  # outermost first
    ours = [f for f in stack if "/pretrain/" in f.filename or "/data_pipeline/" in f.filename]
    site = ours[-1] if ours else stack[-1]
    at = f"{_short(site.filename)}:{site.lineno} in {site.name}"
    collective = next((f for f in stack if any(c in f.filename for c in _COLLECTIVE_FILES)), None)
    if collective is None:
        return f"not in a collective: at {at}"
    inner = [f for f in stack if "torch/distributed/distributed_c10d.py" in f.filename]
    name = inner[-1].name if inner else collective.name
    return f"in {name} ({_short(collective.filename)}) from {at}"


def summarise(out: Path, world: int, step: int) -> str:
    """Rank 0: the other ranks' states (waiting up to PEERS_WAIT_S for their files), grouped by where they are;
    the line that names the ranks not in the collective most ranks wait in, also written to summary.txt."""
    deadline = time.monotonic() + PEERS_WAIT_S
    states: dict[int, str] = {}
    while len(states) < world and time.monotonic() < deadline:
        for r in range(world):
            if r not in states and (out / hang_stack_file(r)).exists():
                states[r] = _state_line(out / hang_stack_file(r))
        time.sleep(0.2)
    groups: dict[str, list[int]] = {}
    for r, state in sorted(states.items()):
        groups.setdefault(re.sub(r":\d+ in ", " in ", state), []).append(r)  # same place, any line
    waiting = [k for k in groups if k.startswith("in ")]
    common = max(waiting, key=lambda k: len(groups[k])) if waiting else None
    parts = [_describe(groups[k], states[groups[k][0]]) for k in ([common] if common else [])]
    parts += [_describe(v, states[v[0]]) for k, v in groups.items() if k != common]
    if silent := [r for r in range(world) if r not in states]:
        parts.append(f"{_ranks(silent)} wrote no stacks (process gone, or frozen outside Python)")
    line = f"hang at step {step}: " + "; ".join(parts)
    (out / HANG_SUMMARY).write_text(line + "\n" + "".join(f"rank {r}: {s}\n" for r, s in sorted(states.items())))
    return line


def _state_line(path: Path) -> str:
    for line in path.read_text(errors="replace").splitlines():
        if line.startswith("main thread: "):
            return line.removeprefix("main thread: ")
    return "unknown"


def _ranks(ranks: list[int]) -> str:
    return f"rank {ranks[0]}" if len(ranks) == 1 else "ranks " + ", ".join(map(str, ranks))


def _describe(ranks: list[int], state: str) -> str:
    """'rank 0 waits in all_reduce (...) from ...' / 'rank 1 is not in a collective (at ...)'."""
    one = len(ranks) == 1
    if state.startswith("in "):
        return f"{_ranks(ranks)} {'waits' if one else 'wait'} {state}"
    if state.startswith("not in a collective: "):
        return f"{_ranks(ranks)} {'is' if one else 'are'} not in a collective ({state.split(': ', 1)[1]})"
    return f"{_ranks(ranks)}: {state}"


def _short(filename: str) -> str:
    for marker in ("/site-packages/", "/pretrain/", "/data_pipeline/"):
        if marker in filename:
            cut = filename.split(marker, 1)[1]
            return cut if marker == "/site-packages/" else marker.strip("/") + "/" + cut
    return filename


def _nccl_flight_record(out: Path, rank: int) -> None:
    """torch's NCCL flight recorder (TORCH_NCCL_TRACE_BUFFER_SIZE, set by init_distributed on NCCL): the last
    collectives of every NCCL group of this rank, with sequence numbers, so a reader sees which one a rank never
    entered. Nothing on gloo."""
    try:
        import torch

        if not (torch.distributed.is_initialized() and torch.distributed.get_backend() == "nccl"):
            return
        trace = torch._C._distributed_c10d._dump_nccl_trace()
    except Exception:  # noqa: BLE001 - the stacks are written; the recorder is an extra
        return
    (out / f"{hang_stack_file(rank)[:-4]}.nccl_trace.pkl").write_bytes(trace)
