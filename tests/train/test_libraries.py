"""A rank's start-up pays only for the libraries it uses (pretrain/libraries.py)."""
from __future__ import annotations

import subprocess
import sys

import pytest

from shared_runs import plain_run
from spawn import REPO, child_env
from train_common import run_python, train_args

pytestmark = pytest.mark.slow  # a training run; DeepSpeed and megatron-core imported in children


def imported(importtime_stderr: str) -> set[str]:
    """The modules a `python -X importtime` process imported."""
    return {line.rsplit("|", 1)[1].strip() for line in importtime_stderr.splitlines()
            if line.startswith("import time:") and "|" in line}


def test_a_training_rank_imports_neither_mlflow_nor_torch_compile_s_compiler(tmp_path_factory, tmp_path):
    """Untracked and uncompiled: MLflow (DeepSpeed's autotuner) and inductor, torch.compile's compiler
    (megatron-core's fused helpers), stay out of the rank: about 2.5 s of CPU less at every start. (torch._dynamo
    itself is imported by torch's optimizers.)"""
    shards = plain_run(tmp_path_factory)[1]
    p = run_python(["-X", "importtime", *train_args(shards, tmp_path / "run", "train.max_steps=1")])
    assert p.returncode == 0, p.stderr[-3000:]
    modules = imported(p.stderr)
    assert {"deepspeed.runtime.engine", "megatron.core.tensor_parallel"} <= modules
    loaded = [m for m in modules if m.startswith(("mlflow.", "torch._inductor.compile_fx"))]  # `mlflow`: the try
    assert not loaded, loaded


def test_without_the_project_s_order_both_libraries_still_pull_those_in():
    """The other half of the claim: when a release of DeepSpeed or megatron-core stops importing them,
    this fails and pretrain/libraries.py can go."""
    p = subprocess.run([sys.executable, "-X", "importtime", "-c", "import deepspeed, megatron.core"], cwd=REPO,
                       env=child_env(DS_ACCELERATOR="cpu"), capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    assert {"mlflow.tracking", "torch._inductor.compile_fx"} <= imported(p.stderr)
