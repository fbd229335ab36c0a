"""One training run per checkpoint directory: a second launch on a live run is refused in one line naming the
holder; a lock whose holder is gone (dead pid, reused pid, the same requeued SLURM job, another host's stopped
heartbeat) is taken over, saying why."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, replace

import pytest

from spawn import REPO, child_env
from train_common import tiny_shards, train_args

from pretrain.checkpoint.run_lock import LOCK_FILE, STALE_S, Holder, RunLock, RunLocked


def _plant(directory, holder: Holder, age_s: float = 0.0) -> None:
    path = directory / LOCK_FILE
    path.write_text(json.dumps(asdict(holder)))
    if age_s:
        t = time.time() - age_s
        os.utime(path, (t, t))


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_a_live_holder_is_named_and_a_released_lock_is_free(tmp_path):
    first = RunLock(tmp_path)
    assert first.acquire() is None
    with pytest.raises(RunLocked, match=rf"is in use by another training run \(host {socket.gethostname()} pid "
                                        rf"{os.getpid()}, started .*\); stop it first"):
        RunLock(tmp_path).acquire()
    first.release()
    assert not (tmp_path / LOCK_FILE).exists()
    again = RunLock(tmp_path)
    assert again.acquire() is None
    again.release()


@pytest.mark.parametrize("case", ["dead pid", "reused pid", "same SLURM job", "other host, old heartbeat"])
def test_a_stale_lock_is_taken_over(tmp_path, monkeypatch, case):
    me = Holder.me()
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    age = 0.0
    if case == "dead pid":
        holder, why = replace(me, pid=_dead_pid()), "is not running"
    elif case == "reused pid":
        holder, why = replace(me, proc_start="1"), "is now another process"
    elif case == "same SLURM job":
        monkeypatch.setenv("SLURM_JOB_ID", "4242")
        monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
        holder, why = replace(me, host="node-elsewhere", slurm_job="4242", slurm_restart=0), "previous run (requeued)"
    else:
        holder, why, age = replace(me, host="node-elsewhere"), "heartbeat stopped", STALE_S + 60
    _plant(tmp_path, holder, age)
    lock = RunLock(tmp_path)
    note = lock.acquire()
    assert note and why in note and holder.describe() in note
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    lock.release()


def test_another_hosts_live_heartbeat_is_respected(tmp_path, monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    _plant(tmp_path, replace(Holder.me(), host="node-elsewhere"), age_s=STALE_S / 2)
    with pytest.raises(RunLocked, match="host node-elsewhere"):
        RunLock(tmp_path).acquire()


@pytest.mark.slow
def test_the_same_command_twice_on_one_directory(tmp_path):
    """The second launch exits 2 at once, naming the first; the first goes on untouched (stopped here by a
    notice: checkpoint, exit 42) and frees the lock. Holding the lock, the first also removed the temporary step
    directory a killed save had left."""
    shards = tiny_shards(tmp_path / "data") / "shards"
    run = tmp_path / "run"
    (run / ".tmp_step_7" / "model").mkdir(parents=True)
    cmd = [sys.executable, *train_args(shards, run, "train.max_steps=100000", "checkpoint.every=10")]
    first = subprocess.Popen(cmd, cwd=REPO, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    deadline = time.monotonic() + 120
    while not (run / "metrics.jsonl").exists():
        assert time.monotonic() < deadline and first.poll() is None, first.communicate()[1][-3000:]
        time.sleep(0.1)
    second = subprocess.run(cmd, cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=120)
    assert second.returncode == 2, second.stderr[-3000:]
    assert f"is in use by another training run (host {socket.gethostname()} pid {first.pid}" in second.stderr
    assert "Traceback" not in second.stderr, second.stderr[-3000:]
    assert first.poll() is None, "the first run died"
    first.send_signal(signal.SIGUSR1)
    _, err = first.communicate(timeout=300)
    assert first.returncode == 42, err[-3000:]
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, len(steps) + 1))
    assert not (run / LOCK_FILE).exists()
    assert not (run / ".tmp_step_7").exists() and "an unfinished save of an earlier launch" in err
