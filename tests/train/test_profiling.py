"""`train.profile: [START, STEPS]`: a torch profiler trace per rank, in Chrome's trace format, for exactly those
steps; logged to the MLflow run (a real SQLite store) and named in the run's last lines."""
from __future__ import annotations

import json

import pytest

from train_common import launch, tiny_shards, train_args

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


def test_a_profile_per_rank_in_the_run_dir_and_in_mlflow(tmp_path):
    import mlflow

    shards = tiny_shards(tmp_path / "data") / "shards"
    run = tmp_path / "run"
    p = launch(2, train_args(shards, run, "train.max_steps=5", "parallel.zero_stage=1", "tracking.enabled=true",
                             "train.profile=[2,2]"))
    assert p.returncode == 0, p.stderr[-3000:]
    assert f"profiles:    {run / 'profiles'}" in p.stdout, p.stdout[-2000:]

    names = sorted(x.name for x in (run / "profiles").iterdir())
    assert names == ["trace_steps2-3_rank0.json", "trace_steps2-3_rank1.json"]
    trace = json.loads((run / "profiles" / names[0]).read_text())
    ops = {e.get("name", "") for e in trace["traceEvents"]}
    assert any(op.startswith("aten::mm") or op.startswith("aten::addmm") for op in ops), sorted(ops)[:50]

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{run / 'mlruns' / 'mlflow.db'}")
    run_id = json.loads((run / "step_5" / "meta.json").read_text())["mlflow_run_id"]
    logged = sorted(a.path for a in client.list_artifacts(run_id, "profiles"))
    assert logged == [f"profiles/{n}" for n in names]
