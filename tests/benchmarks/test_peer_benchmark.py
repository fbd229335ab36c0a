"""benchmarks/peer_hf_deepspeed.py and benchmarks/gpu_check.sh on CPU, so the first GPU session can trust them."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from spawn import REPO, child_env
from pretrain.config import load_config
from pretrain.plan.describe import planned_run


@pytest.mark.slow
def test_peer_trains_transformers_llama_of_our_shape_with_our_deepspeed_config(tmp_path):
    out = tmp_path / "peer.json"
    p = subprocess.run([sys.executable, "benchmarks/peer_hf_deepspeed.py", "--config", "configs/debug.yaml",
                        "--vocab", "1000", "--steps", "4", "--warmup", "2", "--set", "model.tie_embeddings=true",
                        "--out", str(out)], cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.loads(out.read_text())
    ours = planned_run(load_config(REPO / "configs" / "debug.yaml",
                                   ["model.vocab_size=1000", "model.tie_embeddings=true"]), 1).model
    assert ours.vocab_size == 1024  # padded as our run pads it, and the peer computes the same head
    assert r["params"] == ours.num_params()  # the same shape, parameter for parameter
    assert r["deepspeed_config"]["zero_optimization"]["stage"] == 2  # debug.yaml's, through our config builder
    assert r["tokens_per_step"] == 4 * 128 and r["tokens_per_s"] > 0 and len(r["losses"]) == 4
    assert r["device"] == "cpu" and r["mfu"] is None and r["commit"]
    assert "measured by: python benchmarks/peer_hf_deepspeed.py" in p.stdout


def test_gpu_check_refuses_without_cuda_and_lists_its_steps():
    p = subprocess.run(["bash", "benchmarks/gpu_check.sh"], cwd=REPO, env=child_env(), capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 2 and "no CUDA device" in p.stderr
    p = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--dry-run"], cwd=REPO, env=child_env(),
                       capture_output=True, text=True, timeout=60)
    steps = [line.split(":")[0][3:] for line in p.stdout.splitlines() if line.startswith("== ")]
    assert steps == ["gpu_tests", "kernels", "mfu_125m", "peer_125m", "mfu_1b", "peer_1b"]
    assert "gpu_check: commit " in p.stdout and "caches under" in p.stdout  # cold-start caches kept in $WORK
    p = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--dry-run", "--speed"], cwd=REPO,
                       env=child_env(COMMIT="feedbeef", WORK="/tmp/gc"), capture_output=True, text=True, timeout=60)
    limits = {line.split(":")[0][3:]: int(line.split("(limit ")[1].split(" s)")[0])
              for line in p.stdout.splitlines() if line.startswith("== ")}
    assert "commit feedbeef, caches under /tmp/gc" in p.stdout
    assert limits["gpu_tests"] >= 300 and limits["mfu_1b_compile"] >= 300 and limits["mfu_1b_fp8"] >= 300
    for preset in ("configs/125m.yaml", "configs/1b.yaml"):
        assert (REPO / preset).exists() and preset in p.stdout
