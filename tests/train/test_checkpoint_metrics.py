"""Checkpoint timings as metrics: every save's pause, duration, size and speed, and a resume's load time, in
metrics.jsonl and in a real MLflow store (the default SQLite store under the run directory), across a resume.

A foreground save (checkpoint.background=false) has committed before the next step, so its figures are on the
next record for certain; background saves land on the first record after their commit is seen, or, for the last
save of a launch, in MLflow at the step it saved and in summary.json."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from train_common import run_python, tiny_shards, train_args

pytestmark = pytest.mark.slow  # two launches with MLflow tracking

FIELDS = ("ckpt_step", "ckpt_pause_s", "ckpt_save_s", "ckpt_bytes", "ckpt_gbps")


def _size(step_dir: Path) -> int:
    return sum(f.stat().st_size for f in step_dir.rglob("*") if f.is_file())


def _check_save(fields: dict, run: Path) -> None:
    """Sane figures for one save: the size of its step directory, a pause no longer than the save."""
    size = _size(run / f"step_{int(fields['ckpt_step'])}")
    assert abs(fields["ckpt_bytes"] - size) <= 0.01 * size, (fields, size)
    assert 0 <= fields["ckpt_pause_s"] <= fields["ckpt_save_s"] < 60, fields
    assert fields["ckpt_gbps"] == pytest.approx(fields["ckpt_bytes"] / fields["ckpt_save_s"] / 1e9), fields


def test_save_and_load_figures_in_metrics_and_mlflow(tmp_path):
    import mlflow

    shards = tiny_shards(tmp_path / "data") / "shards"
    run = tmp_path / "run"
    common = ["tracking.enabled=true", "tracking.system_metrics_s=0", "checkpoint.keep=10"]
    p = run_python(train_args(shards, run, "train.max_steps=4", "checkpoint.every=2",
                              "checkpoint.background=false", *common))
    assert p.returncode == 0, p.stderr[-3000:]
    first = json.loads((run / "summary.json").read_text())
    assert [s["ckpt_step"] for s in first["final_saves"]] == [4]  # the last save of a launch: no record after it
    p = run_python(train_args(shards, run, "train.max_steps=6", "checkpoint.every=1", *common))  # resumes at 4
    assert p.returncode == 0, p.stderr[-3000:]
    assert "at step 4" in p.stderr
    second = json.loads((run / "summary.json").read_text())

    records = {r["step"]: r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}
    assert sorted(records) == [1, 2, 3, 4, 5, 6]
    on_records = {s: {k: r[k] for k in FIELDS} for s, r in records.items() if r["ckpt_step"] is not None}
    assert on_records[3]["ckpt_step"] == 2  # foreground: committed before step 3
    assert all(save["ckpt_step"] < step for step, save in on_records.items())
    saves = [*on_records.values(), *first["final_saves"], *second["final_saves"]]
    assert sorted(s["ckpt_step"] for s in saves) == [2, 4, 5, 6]  # every save once, on a record or after the last
    for save in saves:
        _check_save(save, run)
    loads = {s: r["ckpt_load_s"] for s, r in records.items() if r["ckpt_load_s"] is not None}
    assert list(loads) == [5] and 0 < loads[5] < 60  # the resumed launch's first record

    # MLflow holds the same figures: at the step of the record that carries them, a launch's last save at its own
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{run / 'mlruns' / 'mlflow.db'}")
    assert second["mlflow_run_id"] == first["mlflow_run_id"]  # the resume continued the MLflow run
    for key in FIELDS:
        logged = sorted(m.value for m in client.get_metric_history(second["mlflow_run_id"], key))
        assert logged == pytest.approx(sorted(float(s[key]) for s in saves)), key
    assert all(m.step >= m.value for m in client.get_metric_history(second["mlflow_run_id"], "ckpt_step"))
    assert [(m.step, m.value) for m in client.get_metric_history(second["mlflow_run_id"], "ckpt_load_s")] == \
        [(5, pytest.approx(loads[5]))]
