"""`pretrain train` with parallel.cp=2 is the same run as cp=1, through the whole loop: the loader's micro-batches
split over the CP ranks, document masks, the training loss, and the held-out loss and bits per byte (validation
scores whole rows: each CP rank's columns joined). Both runs have one DP rank, so they read the same batches."""
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
def test_cp2_trains_and_validates_as_cp1(tmp_path):
    shards = tiny_shards(tmp_path / "data") / "shards"
    runs = {}
    for cp in (1, 2):
        runs[cp] = tmp_path / f"cp{cp}"
        proc = torchrun(cp, train_args(shards, runs[cp], f"train.max_steps={STEPS}", f"parallel.cp={cp}",
                                       "model.document_mask=true", f"data.val_path={shards}", "train.eval_every=3",
                                       "train.eval_steps=2"))
        if cp == 2:
            assert "world 2 = tp 1 x cp 2 x pp 1 x dp 1" in proc.stderr
    one, two = _records(runs[1]), _records(runs[2])
    assert sorted(two) == list(range(1, STEPS + 1))
    for step in one:
        for key in ("loss", "grad_norm", "val_loss", "val_bpb"):
            want = one[step][key]
            if want is None:  # validation on steps 3 and 6 only
                assert two[step][key] is None
                continue
            assert two[step][key] == pytest.approx(want, rel=2e-6), f"step {step} {key}"
    assert one[STEPS]["val_loss"] is not None and one[STEPS]["loss"] < one[1]["loss"]
