"""End to end through the CLI: a DP2 ZeRO-2 run's checkpoint resumes on 1 rank with ZeRO-1 (`resume: auto`),
saying so in one line, and trains on; the same checkpoint under another model is refused in one line."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "train"))
from train_common import run_python, tiny_shards, train_args  # noqa: E402

from shared import copy_of  # noqa: E402
from spawn import torchrun  # noqa: E402


@pytest.fixture(scope="module")
def dp2_run(tmp_path_factory) -> tuple[Path, Path]:
    """(shards, run dir): 4 steps of DP2 ZeRO-2 on 2 ranks, committed at steps 2 and 4. Tests work on copies."""
    root = tmp_path_factory.mktemp("resume_cli")
    shards = tiny_shards(root / "data") / "shards"
    run = root / "run"
    torchrun(2, train_args(shards, run, "train.max_steps=4", "checkpoint.every=2", "parallel.zero_stage=2"),
             timeout=300)
    assert (run / "latest").read_text().strip() == "step_4"
    return shards, run


@pytest.mark.distributed
def test_cli_resumes_a_dp2_zero2_checkpoint_on_one_rank(dp2_run, tmp_path):
    shards, source = dp2_run
    run = copy_of(source, tmp_path / "run")
    # Same global batch (2 x 4 x 1 = 2 x 2 x 2); the loader re-splits the unconsumed samples for the new DP size.
    # One rank is one plain process (what torchrun --nproc-per-node 1 would start, without its parent).
    proc = run_python(train_args(shards, run, "train.max_steps=6", "parallel.zero_stage=1", "train.grad_accum=4"))
    assert proc.returncode == 0, proc.stderr[-3000:]
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


@pytest.mark.distributed
def test_resume_refuses_a_checkpoint_of_another_model_in_one_line(dp2_run, tmp_path):
    """A checkpoint of another model (dim 32 -> 64) under another layout (DP2 ZeRO-2 -> one rank ZeRO-1): exit 2
    with one line naming the difference, before any engine is built (was a ValueError traceback from building the
    new layout's module out of the checkpoint's tensors)."""
    shards, source = dp2_run
    run = copy_of(source, tmp_path / "run")
    p = run_python(train_args(shards, run, "train.max_steps=6", "parallel.zero_stage=1", "train.grad_accum=4",
                              "model.dim=64"))
    assert p.returncode == 2, p.stderr[-3000:]
    assert "holds another model (dim 32 -> 64)" in p.stderr and "Traceback" not in p.stderr, p.stderr[-3000:]
    assert (run / "latest").read_text().strip() == "step_4"  # refused before anything was written
