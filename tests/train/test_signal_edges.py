"""The two ends of a run's life under stop signals, with real ranks under `python -m launch` (2 processes).

A stop signal that lands after the work is done (the final checkpoint committed, `done:` printed, the processes
tearing down) leaves the exit code 0: nothing is lost and nothing needs a requeue. CPython restores the default
handlers while the interpreter shuts down, and SIGUSR1's and SIGTERM's default is to die: such a notice used to kill
the ranks (`launch: ranks exited with [-10]`, the job FAILED).

From the `done:` line on, every process of the run gets SIGUSR1 and SIGTERM every few milliseconds until all have
exited (both signals in one launch: a rank that died of either one fails the exit-0 check).

A notice before the first step: exit 42 with nothing saved, and the segment still counts (segments.jsonl,
summary.json's wall time) once the requeued run has finished. In between, the same storm during a stop's save
neither interrupts the save nor makes a second one.

Each launch costs seconds of start-up (torch, DeepSpeed) and well under one of training, so the three cases are
three launches of one run, each on the state the one before left."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from spawn import REPO, child_env
from train_common import tiny_shards, train_args

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


def _tree(pid: int) -> list[int]:
    """pid and its descendants, from /proc."""
    children: dict[int, list[int]] = {}
    for stat in os.listdir("/proc"):
        if stat.isdigit():
            try:
                text = open(f"/proc/{stat}/stat").read()
            except OSError:
                continue
            children.setdefault(int(text[text.rfind(")") + 2:].split()[1]), []).append(int(stat))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


def _blast(proc: subprocess.Popen, signals: tuple[int, ...], sent: list[int]) -> None:
    """Send `signals` to every process of the run but the launcher, every 5 ms, until the launcher has exited."""
    while proc.poll() is None:
        for pid in _tree(proc.pid)[1:]:  # the ranks (and anything they started)
            for sig in signals:
                try:
                    os.kill(pid, sig)
                    sent[0] += 1
                except ProcessLookupError:
                    pass
        time.sleep(0.005)


def _launch(cmd: list[str]) -> subprocess.Popen:
    """The run under `python -m launch`, its stdout and stderr as one text stream."""
    return subprocess.Popen(cmd, cwd=REPO, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def _segments(records: list[dict]) -> list[tuple[int, int]]:
    return [(s["start_step"], s["end_step"]) for s in records]


def test_stop_signals_before_the_first_step_through_the_stops_save_and_after_done(tmp_path_factory):
    """Three launches of one run, each a case of the module docstring, each on the state the previous one left:

    1. a notice before the first step: exit 42, nothing saved, the segment recorded;
    2. a notice at step 2, then SIGUSR1 and SIGTERM to every rank every 5 ms through the stop's save and the exit:
       the save commits, the run exits 42 once;
    3. the relaunch resumes from that checkpoint and finishes; from its `done:` line on, SIGUSR1 and SIGTERM reach
       every rank every 5 ms until all have exited: exit 0, and summary.json counts all three segments."""
    data = tiny_shards(tmp_path_factory.mktemp("data"))
    run = tmp_path_factory.mktemp("run") / "run"
    args = train_args(data / "shards", run, "train.max_steps=200", "parallel.zero_stage=2",
                      "train.log_every=1")[2:]  # drop "-m pretrain"
    cmd = [sys.executable, "-m", "launch", "--nproc-per-node", "2", "--", "-m", "pretrain", *args]

    # 1. A notice before the first step.
    proc = _launch(cmd)
    time.sleep(1.0)  # the ranks are importing torch
    os.kill(proc.pid, signal.SIGUSR1)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 42 and "before the first step, nothing to save" in out, out[-3000:]
    first = [json.loads(x) for x in (run / "segments.jsonl").read_text().splitlines()]
    assert _segments(first) == [(0, 0)]

    # 2. More signals during the stop's save do not interrupt it.
    proc = _launch(cmd)
    sent, lines, shooter = [0], [], None
    for line in proc.stdout:
        lines.append(line)
        if shooter is None and (run / "metrics.jsonl").exists() and \
                len((run / "metrics.jsonl").read_text().splitlines()) >= 2:
            os.kill(proc.pid, signal.SIGUSR1)  # the notice, through the launcher
            shooter = threading.Thread(target=_blast, args=(proc, (signal.SIGUSR1, signal.SIGTERM), sent))
            shooter.start()
    proc.wait(timeout=120)
    out = "".join(lines)
    assert shooter is not None, out[-3000:]
    shooter.join()
    assert proc.returncode == 42 and sent[0] > 0, f"exit {proc.returncode} after {sent[0]} signals\n{out[-3000:]}"
    assert out.count("checkpoint committed (saved in") == 1, out[-3000:]
    stopped = int((run / "latest").read_text().strip().removeprefix("step_"))
    assert 2 <= stopped < 200

    # 3. The relaunch resumes and finishes; stop signals after `done:` leave exit 0.
    end = stopped + 2
    proc = _launch(cmd + ["--set", f"train.max_steps={end}"])
    sent, lines, shooter = [0], [], None
    for line in proc.stdout:
        lines.append(line)
        if line.startswith(f"done: step {end}") and shooter is None:
            shooter = threading.Thread(target=_blast, args=(proc, (signal.SIGUSR1, signal.SIGTERM), sent))
            shooter.start()
    proc.wait(timeout=300)
    if shooter:
        shooter.join()
    out = "".join(lines)
    assert f"resuming from {run / f'step_{stopped}'}" in out, out[-3000:]
    assert shooter is not None, out[-3000:]
    assert sent[0] > 0, "no signal landed before the ranks exited"
    assert proc.returncode == 0, f"exit {proc.returncode} after {sent[0]} signals after done\n{out[-3000:]}"
    summary = json.loads((run / "summary.json").read_text())
    assert _segments(summary["segments"]) == [(0, 0), (0, stopped), (stopped, end)], summary["segments"]
    assert summary["wall_s"] == pytest.approx(sum(s["wall_s"] for s in summary["segments"]), abs=0.01)
