"""A rank's start-up pays only for the libraries it uses (pretrain/libraries.py)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from shared_runs import plain_run
from spawn import REPO, child_env
from train_common import run_python, train_args


def imported(importtime_stderr: str) -> set[str]:
    """The modules a `python -X importtime` process imported."""
    return {line.rsplit("|", 1)[1].strip() for line in importtime_stderr.splitlines()
            if line.startswith("import time:") and "|" in line}


@pytest.mark.slow  # a training run
def test_a_training_rank_imports_neither_mlflow_nor_torch_compile_s_compiler(tmp_path_factory, tmp_path):
    """Untracked and uncompiled, under ZeRO: MLflow (DeepSpeed's autotuner) and inductor, torch.compile's compiler
    (megatron-core's fused helpers, DeepSpeed's Muon kernels), stay out of the rank: about 4 s of CPU less at every
    start. (torch._dynamo itself is imported by torch's optimizers.)"""
    shards = plain_run(tmp_path_factory)[1]
    p = run_python(["-X", "importtime", *train_args(shards, tmp_path / "run", "train.max_steps=1",
                                                    "parallel.zero_stage=1")])
    assert p.returncode == 0, p.stderr[-3000:]
    modules = imported(p.stderr)
    assert {"deepspeed.runtime.engine", "deepspeed.runtime.zero.stage_1_and_2", "megatron.core.tensor_parallel",
            "deepspeed.runtime.zero.muon.muon_optimizer"} <= modules  # imported by ZeRO's optimizer
    loaded = [m for m in modules if m.startswith(("mlflow.", "torch._inductor.compile_fx"))]  # `mlflow`: the try
    assert not loaded, loaded


# DeepSpeed imported plainly, then its Muon module: the modules loaded after each.
PLAIN = """
import json, sys
seen = {}
import deepspeed
seen["deepspeed"] = sorted(sys.modules)
import deepspeed.runtime.zero.muon.original_muon
seen["muon"] = sorted(sys.modules)
print(json.dumps(seen))
"""


@pytest.mark.slow  # DeepSpeed and megatron-core imported in a child
def test_without_the_project_s_hooks_the_libraries_still_pull_those_in():
    """The other half of the claim: when a release of DeepSpeed or megatron-core stops importing them,
    this fails and that part of pretrain/libraries.py can go."""
    p = run_python(["-c", PLAIN], DS_ACCELERATOR="cpu")
    assert p.returncode == 0, p.stderr[-3000:]
    seen = {step: set(modules) for step, modules in json.loads(p.stdout.splitlines()[-1]).items()}
    compiler = "torch._inductor.compile_fx"
    assert "mlflow.tracking" in seen["deepspeed"] and compiler not in seen["deepspeed"]
    assert compiler in seen["muon"]  # DeepSpeed's Muon kernels, decorated at import
    p = run_python(["-c", "import sys, megatron.core; print('torch._inductor.compile_fx' in sys.modules)"])
    assert p.returncode == 0 and p.stdout.split()[-1] == "True", p.stderr[-3000:]  # megatron-core's fused helpers


EXITING = """
import atexit, concurrent.futures, sys, threading, time
from pathlib import Path
from pretrain.libraries import exit_now

out = Path(sys.argv[1])
atexit.register(lambda: (out / "atexit").write_text("ran"))
threading.Thread(target=lambda: (time.sleep(0.3), (out / "thread").write_text("joined"))).start()
concurrent.futures.ThreadPoolExecutor(1).submit(lambda: (time.sleep(0.3), (out / "executor").write_text("done")))
sys.stdout.write("no newline, block-buffered")
exit_now(7)
"""


def test_exit_now_keeps_what_a_normal_exit_does_before_the_teardown(tmp_path):
    """A non-daemon thread and an executor's pending work finish, atexit handlers run, buffered stdout is written,
    and the code is the process's exit status."""
    p = run_python(["-c", EXITING, str(tmp_path)], PYTHONUNBUFFERED="")  # empty: stdout block-buffered
    assert p.returncode == 7, p.stderr
    assert p.stdout == "no newline, block-buffered"
    assert {f.name: f.read_text() for f in tmp_path.iterdir()} == {"atexit": "ran", "thread": "joined",
                                                                   "executor": "done"}


def test_deepspeed_s_compiled_op_is_cached_inside_the_environment(tmp_path):
    """Two environments on one machine (two clones) no longer rebuild DeepSpeed's CPU comm op for each other
    (about 50 s of CPU each time): its cache is the environment's own, unless the user chose one."""
    show = ("import os, sys; from pretrain.libraries import lighten_imports; lighten_imports(); "
            "print(os.environ['TORCH_EXTENSIONS_DIR'], os.path.join(sys.prefix, 'torch_extensions'))")
    env = {k: v for k, v in child_env().items() if k != "TORCH_EXTENSIONS_DIR"}
    p = subprocess.run([sys.executable, "-c", show], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    chosen, own = p.stdout.split()
    assert chosen == own, p.stderr
    p = subprocess.run([sys.executable, "-c", show], cwd=REPO, env={**env, "TORCH_EXTENSIONS_DIR": str(tmp_path)},
                       capture_output=True, text=True, timeout=60)
    assert p.stdout.split()[0] == str(tmp_path), p.stderr
