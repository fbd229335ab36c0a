"""Sequence parallelism (megatron-core's SP path needs CUDA): TP=2 + SP on 2 GPUs trains like the reference.

Skipped without 2 CUDA devices. Same worker and table format as the CPU parity test, on NCCL.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from parallel_common import reference_run  # noqa: E402
from spawn import child_env, torchrun  # noqa: E402

GPU = ["train.device=cuda", "train.backend=nccl"]
# GPU fp32 matmuls (TF32 off by default for matmul) and NCCL reductions round differently from the CPU reference.
GPU_TOL = 1e-4

GPU_LAYOUTS = [
    ("gpu_tp2_sp", {"tp": 2, "set": [*GPU, "parallel.sequence_parallel=true"]}),
    ("gpu_tp2", {"tp": 2, "set": GPU}),
    ("gpu_dp2_zero1_bf16", {"zero": 1, "set": [*GPU, "train.dtype=bf16"]}),
]


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")
def test_sequence_parallel_matches_reference(tmp_path):
    cases = [{"name": n, **layout} for n, layout in GPU_LAYOUTS]
    (tmp_path / "cases.json").write_text(json.dumps(cases))
    torchrun(2, [str(Path(__file__).parent / "worker.py"), str(tmp_path / "cases.json"), str(tmp_path)],
             timeout=600, env=child_env(CUDA_VISIBLE_DEVICES="0,1"))
    results = json.loads((tmp_path / "results.json").read_text())
    ref_losses, _, _ = reference_run()
    for name, _ in GPU_LAYOUTS:
        r = results[name]
        assert "error" not in r, r.get("error")
        tol = 5e-3 if "bf16" in name else GPU_TOL
        for step, (got, want) in enumerate(zip(r["losses"], ref_losses)):
            assert got == pytest.approx(want, rel=tol), f"{name} step {step}"
        assert r["after_load_loss"] == r["after_save_loss"] and r["nan_skipped"]
    # SP only moves where activations live: same numbers as TP without SP, to fp32 rounding.
    for a, b in zip(results["gpu_tp2_sp"]["losses"], results["gpu_tp2"]["losses"]):
        assert a == pytest.approx(b, rel=GPU_TOL)
