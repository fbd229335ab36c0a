"""`pretrain train` with parallel.cp=2 is the same run as cp=1, through the whole loop, and resumes bit for bit:
the loader's micro-batches split over the CP ranks, document masks, ZeRO-1 over dp x cp, the training loss, and
the held-out loss and bits per byte (validation scores whole rows: each CP rank's columns joined). Both runs have
one DP rank, so they read the same batches. (cp2 -> cp1 and cp1 -> cp2 resumes: tests/reshard.)"""
from __future__ import annotations

import json

import pytest

from spawn import torchrun
from train_common import tiny_shards, train_args

STEPS = 6


def _records(run_dir) -> dict[int, dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r for r in map(json.loads, lines)}


@pytest.mark.distributed
def test_cp2_trains_validates_and_resumes_as_cp1(tmp_path):
    shards = tiny_shards(tmp_path / "data") / "shards"

    def args(run_dir, cp: int, *more: str) -> list[str]:
        return train_args(shards, run_dir, f"train.max_steps={STEPS}", f"parallel.cp={cp}", "parallel.zero_stage=1",
                          "model.document_mask=true", f"data.val_path={shards}", "train.eval_every=3",
                          "train.eval_steps=2", "checkpoint.every=3", *more)

    one, two, resumed = tmp_path / "cp1", tmp_path / "cp2", tmp_path / "cp2_resumed"
    torchrun(1, args(one, 1))
    assert "world 2 = tp 1 x cp 2 x pp 1 x dp 1" in torchrun(2, args(two, 2)).stderr
    a, b = _records(one), _records(two)
    assert sorted(b) == list(range(1, STEPS + 1))
    for step in a:
        for key in ("loss", "grad_norm", "val_loss", "val_bpb"):
            if a[step][key] is None:  # validation on steps 3 and 6 only
                assert b[step][key] is None
                continue
            assert b[step][key] == pytest.approx(a[step][key], rel=2e-6), f"step {step} {key}"
    assert a[STEPS]["val_loss"] is not None and a[STEPS]["loss"] < a[1]["loss"]

    # stopped at step 3 and restarted: the same losses and held-out scores, bit for bit
    proc = torchrun(2, args(resumed, 2, f"checkpoint.resume={two / 'step_3'}"))
    assert f"resuming from {two / 'step_3'} at step 3" in proc.stderr
    c = _records(resumed)
    assert sorted(c) == [4, 5, 6]
    assert all(c[s][k] == b[s][k] for s in c for k in ("loss", "grad_norm", "val_loss", "val_bpb"))
