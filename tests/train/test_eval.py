"""Validation reads its held-out batches once: every eval scores the same batches, without touching the files.

The held-out shards are moved away while the run is going: evals after that must still happen (a loader rebuilt
per eval would re-read the manifest and fail). With an lr of 1e-30 the weights do not move, so every eval must
give the same loss to the last digit: the same batches each time, from the start of the held-out stream.
"""
from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time

import pytest
from spawn import REPO, child_env
from train_common import tiny_shards, train_args

pytestmark = pytest.mark.slow  # trains with held-out evaluation


def test_every_eval_scores_the_same_held_out_batches_read_once(tmp_path):
    data = tiny_shards(tmp_path / "data")
    held_out = tmp_path / "val_shards"
    shutil.copytree(data / "shards", held_out)
    run = tmp_path / "run"
    args = train_args(data / "shards", run, "train.max_steps=100000", f"data.val_path={held_out}",
                      "train.eval_every=1", "train.eval_steps=3", "optim.lr=1e-30", "optim.weight_decay=0",
                      "data.num_workers=1")
    proc = subprocess.Popen([sys.executable, *args], cwd=REPO, env=child_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    metrics, deadline = run / "metrics.jsonl", time.monotonic() + 240

    def logged() -> int:
        return len(metrics.read_text().splitlines()) if metrics.exists() else 0

    while logged() < 2:
        assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(0.05)
    shutil.move(held_out, tmp_path / "moved_away")
    after = logged()
    while logged() < after + 5:
        assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 42, err[-3000:]
    recs = [json.loads(line) for line in metrics.read_text().splitlines()]
    vals = {r["val_loss"] for r in recs}
    assert len(recs) >= after + 5 and None not in vals, "every step was evaluated, also after the files were gone"
    assert len(vals) == 1, f"the same batches every eval: {sorted(vals)}"
