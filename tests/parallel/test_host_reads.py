"""No host read per micro-batch: a training step reads values to the host a fixed number of times, whatever its
grad_accum (on CUDA each read waits for the GPU queue to drain). Counted by spying on the Tensor methods that
copy a value to the host, while one process trains the debug model (gloo, CPU)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from spawn import REPO, child_env

WORKER = r"""
import json, sys, torch
from pretrain.config import load_config
from pretrain.run.distributed import init_distributed
from pretrain.train.engine import build_engine
from pretrain.run.resolved import resolve_run

counts = {}
def spy(name):
    original = getattr(torch.Tensor, name)
    def wrapper(self, *a, **k):
        counts[name] = counts.get(name, 0) + 1
        return original(self, *a, **k)
    setattr(torch.Tensor, name, wrapper)

result = {}
for accum in (1, 4):
    cfg = load_config(None, ["model.flavor=debug", "model.n_layers=2", "model.vocab_size=256", "train.seq_len=16",
                             "train.micro_batch_size=2", f"train.grad_accum={accum}", "train.device=cpu",
                             "parallel.zero_stage=1"])
    run = resolve_run(cfg, 1, require_data=False, vocab_without_data=256)
    env = init_distributed(cfg, layout=run.layout)
    engine = build_engine(cfg, env, run)
    batches = iter([{"tokens": torch.randint(0, 256, (2, 17))} for _ in range(3 * accum)])
    engine.train_step(batches)  # the first step allocates optimizer state: not counted
    if not counts.get("spying"):
        for name in ("item", "cpu", "tolist", "__float__", "numpy"):
            spy(name)
        counts["spying"] = 1
    before = {k: v for k, v in counts.items()}
    engine.train_step(batches)
    result[accum] = {k: counts.get(k, 0) - before.get(k, 0) for k in ("item", "cpu", "tolist", "__float__", "numpy")}
print(json.dumps(result))
"""


@pytest.mark.slow
def test_host_reads_per_step_do_not_grow_with_grad_accum():
    p = subprocess.run([sys.executable, "-c", WORKER], cwd=REPO, env=child_env(), capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    reads = json.loads(p.stdout.splitlines()[-1])
    assert reads["1"] == reads["4"], reads
