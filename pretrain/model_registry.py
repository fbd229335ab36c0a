"""The finished model in MLflow's model registry: an exported Hugging Face directory, logged to the MLflow run that
trained its checkpoint and registered as a new version of a named model.

The version's tags say which step it is, how many tokens it had seen and its validation loss (the last one
measured at or before that step, from metrics.jsonl). The version's source is the run's `hf_model/` artifact
directory, so with the store as registry (`MLFLOW_REGISTRY_URI`, or `mlflow.set_registry_uri`)
`mlflow.artifacts.download_artifacts("models:/NAME/VERSION")` gives back a directory that
`transformers.AutoModelForCausalLM.from_pretrained` loads.
"""
from __future__ import annotations

from pathlib import Path

from pretrain import metrics
from pretrain.config import ConfigError, load_config
from pretrain.tracking import tracking_uri

ARTIFACT_DIR = "hf_model"


def store_uri(step_dir: Path) -> str:
    """The MLflow store the checkpoint's run logged to, resolved as training resolved it, with the run directory
    being the step directory's parent."""
    return tracking_uri(load_config(step_dir / "config.yaml", []), run_dir=step_dir.resolve().parent)


def _val_loss(run_dir: Path, step: int) -> float | None:
    measured = [r["val_loss"] for r in metrics.read(run_dir)
                if r.get("step", 0) <= step and r.get("val_loss") is not None]
    return measured[-1] if measured else None


def check(step_dir: str | Path) -> None:
    """Refuse before exporting: a checkpoint trained without tracking has no run to register under."""
    from pretrain.checkpoint import read_meta

    if not read_meta(step_dir).mlflow_run_id:
        raise ConfigError(f"{step_dir} was trained without MLflow tracking (no run id in meta.json): there is no "
                          f"run to register the model under")


def register(hf_dir: str | Path, step_dir: str | Path, name: str, uri: str | None = None) -> tuple[str, str]:
    """Log `hf_dir` to the MLflow run of `step_dir`'s checkpoint and register it as a new version of `name`;
    returns ("models:/NAME/VERSION", the store's URI)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from pretrain.checkpoint import read_meta
    from pretrain.resolved import ResolvedRun

    step_dir = Path(step_dir)
    check(step_dir)
    meta = read_meta(step_dir)
    uri = uri or store_uri(step_dir)
    client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    try:
        run = client.get_run(meta.mlflow_run_id)
    except MlflowException:
        raise ConfigError(f"{step_dir}: its MLflow run {meta.mlflow_run_id} is not in {uri}") from None
    client.log_artifacts(run.info.run_id, str(hf_dir), ARTIFACT_DIR)
    try:
        client.create_registered_model(name)
    except MlflowException as e:
        if "RESOURCE_ALREADY_EXISTS" not in str(e.error_code):
            raise
    tokens = meta.step * ResolvedRun.from_dict(meta.resolved).tokens_per_step
    tags = {"step": str(meta.step), "tokens_seen": str(tokens), "checkpoint": str(step_dir.resolve())}
    if (val := _val_loss(step_dir.parent, meta.step)) is not None:
        tags["val_loss"] = f"{val:.6g}"
    version = client.create_model_version(name, source=f"{run.info.artifact_uri}/{ARTIFACT_DIR}",
                                          run_id=run.info.run_id, tags=tags)
    return f"models:/{name}/{version.version}", uri
