"""A clean start prints the project's own lines only; `--verbose` brings the libraries' logging back.

A short real run under the local launcher: 2 ranks, ZeRO-2 (DeepSpeed's op build print, its "untested optimizer"
warning, torch's FutureWarning from the ZeRO all-gather), MLflow's embedded store (its INFO lines on creating the
database) and validation. Every line of stdout and stderr must be one of the project's.
"""
from __future__ import annotations

import subprocess
import sys

import pytest

from spawn import REPO, child_env
from train_common import tiny_shards, train_args

OURS = ("launch[", "launch:", "[train] ", "[checkpoint] ", "[tracking] ", "step ", "done: ", "checkpoints: ",
        "metrics: ", "mlflow: ", "             mlflow ui ")


def _run(tmp_path, name: str, *extra: str) -> str:
    shards = tiny_shards(tmp_path / "data") / "shards"
    args = train_args(shards, tmp_path / name, "train.max_steps=3", "parallel.zero_stage=2", "tracking.enabled=true",
                      f"data.val_path={shards}", "train.eval_every=2", "train.eval_steps=1")
    env = child_env()
    env.pop("OMP_NUM_THREADS")  # as a user's shell has it: the launcher sets it
    p = subprocess.run([sys.executable, "-m", "launch", "--nproc-per-node", "2", "--", *args, *extra], cwd=REPO,
                       env=env, capture_output=True, text=True, timeout=400)
    assert p.returncode == 0, p.stderr[-3000:]
    return p.stdout + p.stderr


@pytest.mark.distributed
def test_a_clean_start_prints_only_the_projects_lines_and_verbose_restores_the_rest(tmp_path):
    out = _run(tmp_path, "quiet")
    foreign = [line for line in out.splitlines() if line.strip() and not line.startswith(OURS)]
    assert not foreign, "\n".join(foreign[:20])
    assert "step 1 |" in out and "done: step 3" in out

    loud = _run(tmp_path, "verbose", "--verbose")
    assert "You are using ZeRO with an untested optimizer" in loud
    assert "INFO mlflow" in loud
