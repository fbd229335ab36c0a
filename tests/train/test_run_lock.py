"""One training run per checkpoint directory: a second launch on a live run is refused in one line naming the
holder; a lock whose holder is gone (dead pid, reused pid, the same requeued SLURM job, another host's stopped
heartbeat, an unreadable record no longer refreshed) is taken over, saying why; of several launches taking over
one stale lock at once exactly one wins; a launch never refreshes or removes a lock another one now holds."""
from __future__ import annotations

import json
import multiprocessing
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

from pretrain.checkpoint import run_lock
from pretrain.checkpoint.run_lock import STALE_S, Holder, RunLock, RunLocked
from pretrain.run.paths import LOCK_FILE


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


def _contender(directory, start, results, rounds: int) -> None:
    """One launch per round: all of them try at once (the start barrier), each says whether it won."""
    for r in range(rounds):
        start.wait()
        try:
            RunLock(directory).acquire()
            results.put((r, os.getpid()))
        except RunLocked:
            results.put((r, None))


def test_several_launches_taking_over_one_stale_lock_leave_one_winner(tmp_path):
    n, rounds = 8, 40
    stale = json.dumps(asdict(replace(Holder.me(), pid=_dead_pid())))
    ctx = multiprocessing.get_context("fork")  # no re-import: the contenders are ready at once
    start, results = ctx.Barrier(n + 1), ctx.Queue()
    procs = [ctx.Process(target=_contender, args=(tmp_path, start, results, rounds)) for _ in range(n)]
    for p in procs:
        p.start()
    outcomes = []
    try:
        for _ in range(rounds):
            (tmp_path / LOCK_FILE).write_text(stale)  # a new stale lock (its holder's pid is dead) each round
            start.wait(timeout=60)
            winners = [pid for _, pid in (results.get(timeout=60) for _ in range(n)) if pid is not None]
            outcomes.append((winners, json.loads((tmp_path / LOCK_FILE).read_text())["pid"]))
    finally:
        start.abort()  # after a failure: no contender is left waiting for the next round
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    assert all(len(w) == 1 and w[0] == holder for w, holder in outcomes), outcomes


@pytest.mark.parametrize("age_s", [0.0, STALE_S + 60])
def test_an_unreadable_lock_is_held_while_its_heartbeat_is_fresh(tmp_path, age_s):
    path = tmp_path / LOCK_FILE
    path.write_text('{"host": "node-')  # its holder refreshes the mtime, whatever the content
    if age_s:
        os.utime(path, (time.time() - age_s,) * 2)
        lock = RunLock(tmp_path)
        note = lock.acquire()
        assert "its record is unreadable and its heartbeat stopped" in note
        assert json.loads(path.read_text())["pid"] == os.getpid()
        lock.release()
        return
    with pytest.raises(RunLocked) as refused:
        RunLock(tmp_path).acquire()
    assert "\n" not in str(refused.value) and f"its {LOCK_FILE} is unreadable but was refreshed" in str(refused.value)
    assert path.read_text() == '{"host": "node-'  # untouched


def test_a_lock_taken_over_is_neither_refreshed_nor_removed_by_its_former_holder(tmp_path, monkeypatch):
    """Our heartbeat stalled past STALE_S and a launch on another host took over: from then on it is theirs."""
    monkeypatch.setattr(run_lock, "HEARTBEAT_S", 0.05)
    ours = RunLock(tmp_path)
    ours.acquire()
    theirs = tmp_path / "theirs"
    theirs.write_text(json.dumps(asdict(replace(Holder.me(), host="node-elsewhere", pid=1))))
    old = time.time() - STALE_S / 2
    os.utime(theirs, (old, old))
    os.replace(theirs, tmp_path / LOCK_FILE)
    time.sleep(0.3)  # several heartbeats
    ours.release()
    assert json.loads((tmp_path / LOCK_FILE).read_text())["host"] == "node-elsewhere"
    assert (tmp_path / LOCK_FILE).stat().st_mtime == pytest.approx(old, abs=1)


def test_another_hosts_live_heartbeat_is_respected(tmp_path, monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    _plant(tmp_path, replace(Holder.me(), host="node-elsewhere"), age_s=STALE_S / 2)
    with pytest.raises(RunLocked, match="host node-elsewhere"):
        RunLock(tmp_path).acquire()


def _refused_naming(cmd: list[str], holder: str) -> None:
    """A second launch of `cmd` exits 2 at once, in one line naming `holder`."""
    second = subprocess.run(cmd, cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=120)
    assert second.returncode == 2, second.stderr[-3000:]
    assert f"is in use by another training run {holder}" in second.stderr, second.stderr[-3000:]
    assert "Traceback" not in second.stderr, second.stderr[-3000:]


@pytest.mark.slow
def test_the_same_command_twice_on_one_directory_with_a_readable_then_an_unreadable_record(tmp_path):
    """The second launch exits 2 at once, naming the first; with the first's record then damaged in place, a third
    is refused too, naming its fresh heartbeat (one live run serves both cases: each extra launch costs seconds of
    start-up). The first goes on untouched, its metrics.jsonl not cut (stopped here by a notice: checkpoint, exit
    42) and frees the lock. Holding the lock, the first also removed the temporary step directory a killed save had
    left."""
    shards = tiny_shards(tmp_path / "data") / "shards"
    run = tmp_path / "run"
    (run / ".tmp_step_7" / "model").mkdir(parents=True)
    cmd = [sys.executable, *train_args(shards, run, "train.max_steps=100000", "checkpoint.every=10")]
    first = subprocess.Popen(cmd, cwd=REPO, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    try:
        deadline = time.monotonic() + 120
        while not (run / "metrics.jsonl").exists():
            assert time.monotonic() < deadline and first.poll() is None, first.communicate()[1][-3000:]
            time.sleep(0.1)
        _refused_naming(cmd, f"(host {socket.gethostname()} pid {first.pid}")
        assert first.poll() is None, "the first run died"
        (run / LOCK_FILE).write_text("\0" * 40)  # in place: the first run's heartbeat still refreshes this file
        _refused_naming(cmd, f"(its {LOCK_FILE} is unreadable but was refreshed")
        assert first.poll() is None, "the first run died"
        first.send_signal(signal.SIGUSR1)
        _, err = first.communicate(timeout=300)
        assert first.returncode == 42, err[-3000:]
    finally:
        if first.poll() is None:  # a failed assertion: not left training
            first.kill()
            first.wait()
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, len(steps) + 1))
    assert not (run / LOCK_FILE).exists()
    assert not (run / ".tmp_step_7").exists() and "an unfinished save of an earlier launch" in err
