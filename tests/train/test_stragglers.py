"""A slow rank is named while the run goes on: its compute time (the step less DeepSpeed's collectives) beside the
other ranks', in metrics.jsonl, MLflow and one warning line; a balanced run names nobody."""
from __future__ import annotations

import json

import pytest
from train_common import launch, tiny_shards, train_args

pytestmark = pytest.mark.slow  # trains on 2 ranks, twice


def _records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_a_slow_rank_is_named_and_a_balanced_run_names_nobody(tmp_path):
    import mlflow

    data = tiny_shards(tmp_path / "data")
    slow = tmp_path / "slow"
    args = ["train.max_steps=4", "train.log_every=1", "tracking.enabled=true", "tracking.system_metrics_s=0"]
    # 1 s: far above the step's own time and what a loaded machine adds to it, so the ratio stays near its
    # ceiling of 2 (with 2 ranks the median is their mean)
    p = launch(2, train_args(data / "shards", slow, *args), PRETRAIN_INJECT_SLOW_RANK="1:1.0")
    assert p.returncode == 0, p.stderr[-3000:]
    records = _records(slow)
    assert [r["straggler_rank"] for r in records] == [1] * 4
    assert all(r["straggler_ratio"] > 1.5 and r["straggler_host"] for r in records), records
    assert all(r["compute_median_s"] > 0 for r in records)
    (warning,) = [x for x in p.stderr.splitlines() if "straggler:" in x]
    assert "rank 1 on " in warning and "3 logged steps in a row, up to step 3" in warning, warning

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{slow / 'mlruns' / 'mlflow.db'}")
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert [m.value for m in client.get_metric_history(run.info.run_id, "straggler_rank")] == [1.0] * 4

    balanced = tmp_path / "balanced"
    p = launch(2, train_args(data / "shards", balanced, *args[:2]))
    assert p.returncode == 0, p.stderr[-3000:]
    assert "straggler:" not in p.stderr
    assert all(r["straggler_rank"] in (0, 1) for r in _records(balanced))  # measured all the same
