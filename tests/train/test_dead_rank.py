"""A rank that stops answering fails the run within `train.collective_timeout_s`, instead of hanging it.

What a dead node looks like to its peers: its sockets stay open and nothing arrives (a killed *process* closes its
sockets and gloo fails at once; a lost node, a hung GPU or a stopped process does not). SIGSTOP is that case on
one machine. The ranks are plain processes (no torchrun agent that could clean up for them): only the timeout can
end rank 0. (With PP=2 the rank blocks in DeepSpeed's pipeline send/recv, which gloo runs on the default group;
the groups DeepSpeed creates itself, with torch's 30-minute default, are checked by the second test.)
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from spawn import REPO, child_env
from train_common import tiny_shards, train_args

TIMEOUT_S = 20  # small for the test; generous enough for a loaded 2-core machine's start-up barriers


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.distributed
def test_a_stopped_rank_fails_the_others_within_the_collective_timeout(tmp_path):
    shards = tiny_shards(tmp_path / "data") / "shards"
    run = tmp_path / "run"
    args = train_args(shards, run, "train.max_steps=100000", "parallel.pp=2", "parallel.zero_stage=1",
                      f"train.collective_timeout_s={TIMEOUT_S}")
    port = str(_free_port())
    ranks = [subprocess.Popen([sys.executable, *args], cwd=REPO, stdout=subprocess.DEVNULL,
                              stderr=open(tmp_path / f"rank{r}.err", "w"),
                              env=child_env(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2",
                                            MASTER_ADDR="127.0.0.1", MASTER_PORT=port))
             for r in range(2)]
    try:
        metrics, deadline = run / "metrics.jsonl", time.monotonic() + 240
        while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
            assert time.monotonic() < deadline and all(p.poll() is None for p in ranks), \
                (tmp_path / "rank0.err").read_text()[-3000:]
            time.sleep(0.05)
        os.kill(ranks[1].pid, signal.SIGSTOP)  # rank 1 (pipeline stage 1) stops answering mid-run
        stopped_at = time.monotonic()
        try:
            code = ranks[0].wait(timeout=TIMEOUT_S + 60)
        except subprocess.TimeoutExpired:
            pytest.fail(f"rank 0 still waiting {TIMEOUT_S + 60} s after its peer stopped "
                        f"(train.collective_timeout_s={TIMEOUT_S})")
        waited = time.monotonic() - stopped_at
        assert code == 4, f"exit {code}"
        assert waited >= TIMEOUT_S * 0.5, f"rank 0 exited after {waited:.1f} s: not by the timeout"
        err = (tmp_path / "rank0.err").read_text()
        assert "another rank died or stopped answering (train.collective_timeout_s=20)" in err, err[-3000:]
        assert "Traceback" not in err, "one line, not a traceback per rank"
    finally:
        for p in ranks:
            if p.poll() is None:
                p.kill()
                p.wait()


_GROUP_TIMEOUTS = """
import sys, torch
from torch.distributed.distributed_c10d import _world
from pretrain.config import load_config
from pretrain.run.distributed import init_distributed
from pretrain.train.engine import build_engine
from pretrain.run.resolved import resolve_run
cfg = load_config(sys.argv[1], sys.argv[2:])
run = resolve_run(cfg, 1)
env = init_distributed(cfg, layout=run.layout)
build_engine(cfg, env, run)  # DeepSpeed creates groups of its own here
env.apply_collective_timeout()  # what pretrain.train.loop does right after building the engine
for group in _world.pg_map:
    print("timeout", group._get_backend(torch.device("cpu")).options._timeout.total_seconds())
"""


@pytest.mark.slow
def test_every_process_group_gets_the_configured_timeout(tmp_path):
    """torch's default group, megatron-core's groups and DeepSpeed's own (made with torch's 30-minute default)."""
    shards = tiny_shards(tmp_path / "data") / "shards"
    overrides = [a for a in train_args(shards, tmp_path / "run")[5:] if a != "--set"]
    p = subprocess.run([sys.executable, "-c", _GROUP_TIMEOUTS, str(REPO / "configs" / "debug.yaml"), *overrides,
                        "parallel.zero_stage=2", "train.collective_timeout_s=7"],  # ZeRO-2: DeepSpeed adds a group
                       cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stderr[-3000:]
    timeouts = [float(line.split()[1]) for line in p.stdout.splitlines() if line.startswith("timeout ")]
    assert len(timeouts) > 10 and set(timeouts) == {7.0}, timeouts
