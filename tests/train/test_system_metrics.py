"""What a run shows of the machine (a real SQLite MLflow store): MLflow's system metrics for the node (CPU, host
memory), the loader's wait and the tokens seen per step, and an ETA in the step log."""
from __future__ import annotations

import json

import pytest

from train_common import run_python, tiny_shards, train_args

pytestmark = pytest.mark.slow


def test_system_metrics_loader_wait_tokens_and_eta(tmp_path):
    import mlflow

    shards = tiny_shards(tmp_path / "data") / "shards"
    run = tmp_path / "run"
    p = run_python(train_args(shards, run, "train.max_steps=150", "tracking.enabled=true",
                              "tracking.system_metrics_s=0.2", "train.log_every=10"))
    assert p.returncode == 0, p.stderr[-3000:]
    assert "| eta " in p.stdout, p.stdout[-2000:]

    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(r["data_wait_s"] >= 0 and r["eta_s"] >= 0 for r in records)
    assert records[-1]["eta_s"] == 0 and records[-1]["tokens"] == 150 * 4 * 32

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{run / 'mlruns' / 'mlflow.db'}")
    run_id = json.loads((run / "step_150" / "meta.json").read_text())["mlflow_run_id"]
    logged = client.get_run(run_id).data.metrics
    assert {"system/node0/cpu_utilization_percentage", "system/node0/system_memory_usage_megabytes"} <= set(logged), \
        sorted(logged)
    assert [m.step for m in client.get_metric_history(run_id, "data_wait_s")] == list(range(1, 151))
    assert logged["tokens"] == 150 * 4 * 32
