"""Run by test_cuda_host_selection.py in a pytest process that believes one CUDA device exists (not collected by
the suite itself: its name does not start with test_). What a CPU test launches there must still be CPU."""
from __future__ import annotations

import os
import subprocess
import sys

from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "train"))
from spawn import REPO, child_env  # noqa: E402
from train_common import train_args  # noqa: E402
from pretrain.config import load_config  # noqa: E402
from pretrain.run.distributed import _pick_device  # noqa: E402


def test_children_of_a_cpu_test_see_no_gpu_and_keep_the_callers_path():
    assert torch.cuda.is_available()  # the plugin's belief
    env = child_env()
    assert env["CUDA_VISIBLE_DEVICES"] == ""
    p = subprocess.run([sys.executable, "-c", "import extra_site_module, torch; print(torch.cuda.device_count())"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]  # the caller's PYTHONPATH entry is still importable
    assert p.stdout.split()[-1] == "0"
    assert env["PYTHONPATH"].split(os.pathsep)[0] == str(REPO)


def test_the_training_helpers_arguments_pick_cpu_and_gloo_on_a_cuda_host(tmp_path):
    args = train_args(tmp_path / "shards", tmp_path / "run")
    overrides = [args[i + 1] for i, a in enumerate(args) if a == "--set"]
    cfg = load_config(REPO / "configs" / "debug.yaml", overrides)
    assert (cfg.train.device, cfg.train.backend) == ("cpu", "gloo")
    assert _pick_device(cfg, local_rank=1) == torch.device("cpu")  # not torch.cuda.set_device(1)
