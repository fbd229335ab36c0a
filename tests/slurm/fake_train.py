"""Stand-in for `python -m pretrain train` in the SLURM tests: the same contract, a model small enough to be free.

Contract it honours (the real training command's): `--config FILE [--set k=v ...]` read by
`pretrain.config.load_config`; real torch.distributed (gloo) across the ranks torchrun starts; per-step losses
appended to `<checkpoint.dir>/metrics.jsonl` by rank 0; SIGUSR1/SIGTERM set a flag, the ranks agree on it at a
step boundary (all-reduce), checkpoint, and exit with the requeue code 42; `checkpoint.resume: auto` continues
from `<checkpoint.dir>/latest`.

The "model" is linear regression with a gradient all-reduced across ranks, so the loss curve depends on every
rank's data and on the exact resume state: a lost or repeated step changes the numbers.
Extra, for the tests: every rank appends who/where it ran to `<checkpoint.dir>/attempts.jsonl`, and
FAKE_TRAIN_STEP_SECONDS (default 0) slows each step down so a test can signal mid-run.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from pretrain.config import load_config

from pretrain.run.exits import EXIT_REQUEUE

DIM = 8
LR = 0.05
_stop = False


def _on_signal(signum: int, _frame: object) -> None:
    global _stop
    _stop = True


def _append(path: Path, record: dict) -> None:
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")


def _save(latest: Path, step: int, w: torch.Tensor) -> None:
    tmp = latest.with_name(latest.name + ".tmp")
    tmp.write_text(json.dumps({"step": step, "w": w.tolist()}))
    os.replace(tmp, latest)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", nargs="?", default="train")
    parser.add_argument("--config", required=True)
    parser.add_argument("--set", action="append", default=[])
    args = parser.parse_args()
    cfg = load_config(args.config, args.set)

    signal.signal(signal.SIGUSR1, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    run_dir = Path(cfg.checkpoint.dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    latest = run_dir / "latest"

    w_true = torch.randn(DIM, generator=torch.Generator().manual_seed(cfg.train.seed), dtype=torch.float64)
    w = torch.zeros(DIM, dtype=torch.float64)
    start = 0
    if cfg.checkpoint.resume == "auto" and latest.exists():
        state = json.loads(latest.read_text())
        start, w = state["step"], torch.tensor(state["w"], dtype=torch.float64)
    _append(run_dir / "attempts.jsonl", {
        "rank": rank, "world": world, "start_step": start, "host": socket.gethostname(),
        "node": os.environ.get("SLURMD_NODENAME"), "job": os.environ.get("SLURM_JOB_ID"),
        "restart_count": int(os.environ.get("SLURM_RESTART_COUNT", "0")),
        "master": f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}"})

    delay = float(os.environ.get("FAKE_TRAIN_STEP_SECONDS", "0"))
    for step in range(start, cfg.train.max_steps):
        stop = torch.tensor([1.0 if _stop else 0.0])
        dist.all_reduce(stop, op=dist.ReduceOp.MAX)  # every rank sees the signal at the same step boundary
        if stop.item() > 0:
            if rank == 0:
                _save(latest, step, w)
            dist.barrier()
            print(f"fake_train rank {rank}: stopped by signal at step {step}, checkpointed", flush=True)
            dist.destroy_process_group()
            return EXIT_REQUEUE
        g = torch.Generator().manual_seed(cfg.train.seed * 1000003 + step * 1009 + rank)
        x = torch.randn(16, DIM, generator=g, dtype=torch.float64)
        err = x @ w - x @ w_true
        loss = (err ** 2).mean()
        grad = 2 * x.T @ err / x.shape[0]
        dist.all_reduce(grad)
        dist.all_reduce(loss)
        w = w - LR * grad / world
        if rank == 0:
            _append(run_dir / "metrics.jsonl", {"step": step + 1, "loss": loss.item() / world})
        time.sleep(delay)
    if rank == 0:
        _save(latest, cfg.train.max_steps, w)
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
