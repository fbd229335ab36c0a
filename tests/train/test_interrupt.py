"""Ctrl-C on a 2-rank run under the local launcher: the agreed stop (checkpoint, exit 42), quietly; twice: at once.

A terminal's Ctrl-C is SIGINT to the foreground process group: here the launcher runs in a session of its own and
the test signals that whole group, as the terminal would (torchrun puts each rank in a session of its own, so only
the launcher is in it: what reaches the ranks is what the launcher forwards).
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from spawn import REPO, child_env
from train_common import losses, tiny_shards, train_args


def _launch(args: list[str], log: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "launch", "--nproc-per-node", "2", "--", *args]
    return subprocess.Popen(cmd, cwd=REPO, env=child_env(), stdout=open(log, "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def _wait_for_steps(proc: subprocess.Popen, run: Path, n: int, log: Path) -> None:
    metrics, deadline = run / "metrics.jsonl", time.monotonic() + 240
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= n):
        assert time.monotonic() < deadline and proc.poll() is None, log.read_text()[-3000:]
        time.sleep(0.05)


@pytest.mark.distributed
def test_ctrl_c_checkpoints_and_exits_42_and_twice_exits_at_once(tmp_path):
    shards = tiny_shards(tmp_path / "data") / "shards"
    run = tmp_path / "run"
    # grad_accum 16: steps long enough (~0.5 s) that a second Ctrl-C lands before the stop has finished
    args = train_args(shards, run, "train.max_steps=100000", "parallel.zero_stage=2", "train.grad_accum=16")

    log = tmp_path / "first.log"
    proc = _launch(args, log)
    _wait_for_steps(proc, run, 3, log)
    os.killpg(proc.pid, signal.SIGINT)
    assert proc.wait(timeout=120) == 42, log.read_text()[-3000:]
    out = log.read_text()
    stopped = max(losses(run))
    assert (run / "latest").read_text().strip() == f"step_{stopped}", "the checkpoint of the step it stopped at"
    assert "Traceback" not in out and "KeyboardInterrupt" not in out, out[-3000:]
    assert re.search(rf"\[train\] stopped by signal SIGINT at step {stopped}; checkpoint committed \(saved in "
                     rf"\d+\.\d s\); exit 42", out), out[-3000:]

    log = tmp_path / "second.log"
    proc = _launch(args, log)  # resumes from that checkpoint
    _wait_for_steps(proc, run, stopped + 2, log)
    os.killpg(proc.pid, signal.SIGINT)
    deadline = time.monotonic() + 30
    while "[train] interrupt: stopping after the current step" not in log.read_text():  # the ranks have it
        assert time.monotonic() < deadline and proc.poll() is None, log.read_text()[-3000:]
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGINT)
    sent = time.monotonic()
    try:
        code = proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("a second Ctrl-C did not end the run")
    out = log.read_text()
    assert code == 130, out[-3000:]
    assert time.monotonic() - sent < 15
    assert "second interrupt: exiting now without a checkpoint" in out and "Traceback" not in out, out[-3000:]
