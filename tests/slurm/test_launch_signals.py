"""`python -m launch` without SLURM: a preemption notice (SIGUSR1 to the launcher) or a stop request (SIGTERM)
becomes checkpoint + exit 42.

Covers the two places a notice can land: while the ranks are still importing (before any handler exists: it must
be held, not kill them) and mid-run; then a plain relaunch resumes, and the four runs together give exactly the
losses of one uninterrupted run.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from slurm_helpers import FAKE_SEED, FAKE_STEPS, FAKE_TRAIN, REPO, child_env, read_jsonl, write_config

# No cluster here: not in the "slurm" xdist group. The uninterrupted reference is the stand-in's shared one
# (conftest.py: fake_reference, built once per session whichever worker asks first).
pytestmark = [pytest.mark.distributed, pytest.mark.slow]

STEPS = FAKE_STEPS


def _launch(cfg: Path, **env: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "launch", "--nproc-per-node", "2", "--", str(FAKE_TRAIN), "--config", str(cfg)]
    return subprocess.Popen(cmd, cwd=REPO, env=child_env(**env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def _blocked_usr1(pid: int, timeout: float = 60.0) -> None:
    """Wait until the launcher has blocked SIGUSR1 (its first statement): the earliest instant a notice can be
    held. A fixed sleep raced the interpreter's own start-up on a loaded machine or under coverage.py, where that
    start-up alone can outlast it; before that statement no Python process can hold a signal."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = Path(f"/proc/{pid}/status").read_text()
        blocked = int(next(line.split()[1] for line in status.splitlines() if line.startswith("SigBlk:")), 16)
        if blocked & (1 << (signal.SIGUSR1 - 1)):
            return
        time.sleep(0.01)
    raise AssertionError(f"the launcher (pid {pid}) never blocked SIGUSR1")


def _finish(proc: subprocess.Popen) -> tuple[int, str]:
    out, _ = proc.communicate(timeout=240)
    return proc.returncode, out


def test_usr1_to_the_launcher_checkpoints_exits_42_and_a_relaunch_resumes(fake_reference: list[dict],
                                                                          tmp_path: Path) -> None:
    run = tmp_path / "run"
    cfg = write_config(tmp_path / "cfg.yaml", run, max_steps=STEPS, seed=FAKE_SEED)

    # 1. A notice or a stop request (SIGTERM: `kill`, a container runtime) during start-up: the ranks are still
    #    importing torch.
    for sig in (signal.SIGUSR1, signal.SIGTERM):
        proc = _launch(cfg, FAKE_TRAIN_STEP_SECONDS="0.2")
        _blocked_usr1(proc.pid)
        time.sleep(0.5)  # the ranks are starting
        os.kill(proc.pid, sig)
        code, out = _finish(proc)
        assert code == 42, (sig, out)
        assert "stopped by signal at step 0" in out and not read_jsonl(run / "metrics.jsonl"), out

    # 2. SIGTERM mid-run (USR1 mid-run goes through the launcher in tests/slurm/test_signal_sweep.py).
    proc = _launch(cfg, FAKE_TRAIN_STEP_SECONDS="0.2")
    deadline = time.monotonic() + 120
    while len(read_jsonl(run / "metrics.jsonl")) < 3:
        assert time.monotonic() < deadline and proc.poll() is None, "the relaunch never started stepping"
        time.sleep(0.1)
    os.kill(proc.pid, signal.SIGTERM)
    code, out = _finish(proc)
    assert code == 42, out
    stopped_at = len(read_jsonl(run / "metrics.jsonl"))
    assert 3 <= stopped_at < STEPS

    # 3. Plain relaunch finishes (exit 0); the curve is the uninterrupted one (plain torchrun), step for step.
    code, out = _finish(_launch(cfg))
    assert code == 0, out
    assert read_jsonl(run / "metrics.jsonl") == fake_reference
    assert [a["start_step"] for a in read_jsonl(run / "attempts.jsonl") if a["rank"] == 0] == [0, 0, 0, stopped_at]
