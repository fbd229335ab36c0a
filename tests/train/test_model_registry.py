"""The finished model in MLflow's model registry (a real SQLite store): `train.register_as` at the end of a run
and `pretrain export-hf --register`, each a new version tagged with its step, tokens seen and validation loss;
what MLflow gives back for `models:/NAME/VERSION` is a directory transformers loads and runs."""
from __future__ import annotations

import json

import pytest
import torch

from train_common import run_python, tiny_shards, train_args

from pretrain.cli import main as cli

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.slow


def test_register_at_the_end_of_training_and_from_export(tmp_path, monkeypatch):
    import mlflow

    shards = tiny_shards(tmp_path / "data") / "shards"
    run = tmp_path / "run"
    p = run_python(train_args(shards, run, "train.max_steps=3", "tracking.enabled=true", f"data.val_path={shards}",
                              "train.eval_every=3", "train.eval_steps=1", "train.register_as=tiny-llama"))
    assert p.returncode == 0, p.stderr[-3000:]
    assert "registered models:/tiny-llama/1" in p.stdout, p.stdout[-2000:]

    uri = f"sqlite:///{run / 'mlruns' / 'mlflow.db'}"
    client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    version = client.get_model_version("tiny-llama", "1")
    meta = json.loads((run / "step_3" / "meta.json").read_text())
    assert version.run_id == meta["mlflow_run_id"]
    val = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()][-1]["val_loss"]
    assert version.tags["step"] == "3" and int(version.tags["tokens_seen"]) == 3 * 4 * 32
    assert float(version.tags["val_loss"]) == pytest.approx(val, rel=1e-5)

    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", uri)  # models:/ URIs resolve in the registry, not the tracking store
    local = mlflow.artifacts.download_artifacts("models:/tiny-llama/1", dst_path=str(tmp_path / "dl"))
    model = transformers.AutoModelForCausalLM.from_pretrained(local)
    logits = model(torch.tensor([[1, 2, 3]])).logits
    assert logits.shape[:2] == (1, 3) and torch.isfinite(logits).all()

    assert cli(["export-hf", "--checkpoint", str(run / "step_3"), "--out", str(tmp_path / "again"),
                "--register", "tiny-llama"]) == 0
    assert client.get_model_version("tiny-llama", "2").tags["step"] == "3"
