"""End to end through the CLI: a DP2 ZeRO-2 run's checkpoint resumes on 1 rank with ZeRO-1 (`resume: auto`),
saying so in one line, and trains on."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "train"))
from train_common import tiny_shards, train_args  # noqa: E402

from conftest import torchrun  # noqa: E402


@pytest.mark.distributed
def test_cli_resumes_a_dp2_zero2_checkpoint_on_one_rank(tmp_path):
    shards = tiny_shards(tmp_path / "data") / "shards"
    run = tmp_path / "run"
    torchrun(2, train_args(shards, run, "train.max_steps=4", "checkpoint.every=2", "parallel.zero_stage=2"),
             timeout=300)
    assert (run / "latest").read_text().strip() == "step_4"
    # Same global batch (2 x 4 x 1 = 2 x 2 x 2); the loader re-splits the unconsumed samples for the new DP size.
    proc = torchrun(1, train_args(shards, run, "train.max_steps=6", "parallel.zero_stage=1", "train.grad_accum=4"),
                    timeout=300)
    assert ("checkpoint step_4 was written with tp 1 x pp 1 x dp 2 ZeRO-2; re-slicing weights and optimizer "
            "state for tp 1 x pp 1 x dp 1 ZeRO-1") in proc.stderr, proc.stderr[-3000:]
    assert "resuming from" in proc.stderr and "at step 4" in proc.stderr
    # The loader's own line: the samples not yet consumed are re-split exactly over the new DP ranks (no restart).
    assert "loader: re-partitioning the unconsumed samples" in proc.stderr, proc.stderr
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    assert [r["step"] for r in recs] == [1, 2, 3, 4, 5, 6]
    assert all(math.isfinite(r["loss"]) for r in recs)
    # It continued the curve (seen: 5.96 5.93 5.82 5.75 | 5.71 5.64); a restart from the init would be back at ~5.96.
    assert recs[4]["loss"] < recs[3]["loss"] < recs[0]["loss"] - 0.1
    assert (run / "latest").read_text().strip() == "step_6"


def test_resume_refuses_a_checkpoint_of_another_model_in_one_line(tmp_path):
    """A checkpoint of another model (dim 32 -> 64) under another layout (ZeRO-0 -> ZeRO-1): exit 2 with one line
    naming the difference, before any engine is built (was a ValueError traceback from building the new layout's
    module out of the checkpoint's tensors)."""
    import subprocess

    from spawn import REPO, child_env

    shards = tiny_shards(tmp_path / "data") / "shards"
    run = tmp_path / "run"
    first = subprocess.run([sys.executable, *train_args(shards, run, "train.max_steps=1", "checkpoint.every=1")],
                           cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    p = subprocess.run([sys.executable, *train_args(shards, run, "train.max_steps=2", "parallel.zero_stage=1",
                                                    "model.dim=64")],
                       cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 2, p.stderr[-3000:]
    assert "holds another model (dim 32 -> 64)" in p.stderr and "Traceback" not in p.stderr, p.stderr[-3000:]
