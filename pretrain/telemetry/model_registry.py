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

from pretrain.checkpoint import read_meta
from pretrain.checkpoint.weights import open_weights
from pretrain.config import ConfigError, load_config
from pretrain.hf.export import export_checkpoint
from pretrain.run.paths import CONFIG, HF_EXPORTS_DIR
from pretrain.run.resolved import ResolvedRun
from pretrain.telemetry import metrics
from pretrain.telemetry.tracking import tracking_uri

ARTIFACT_DIR = "hf_model"  # in the MLflow run's artifacts


def store_uri(step_dir: Path) -> str:
    """The MLflow store the checkpoint's run logged to, resolved as training resolved it, with the run directory
    being the step directory's parent."""
    return tracking_uri(load_config(step_dir / CONFIG, []), run_dir=step_dir.resolve().parent)


def _val_loss(run_dir: Path, step: int) -> float | None:
    measured = [r["val_loss"] for r in metrics.read(run_dir)
                if r.get("step", 0) <= step and r.get("val_loss") is not None]
    return measured[-1] if measured else None


def check(step_dir: str | Path) -> None:
    """Refuse before exporting: a checkpoint trained without tracking has no run to register under."""
    if not read_meta(step_dir).mlflow_run_id:
        raise ConfigError(f"{step_dir} was trained without MLflow tracking (no run id in meta.json): there is no "
                          f"run to register the model under")


def register(hf_dir: str | Path, step_dir: str | Path, name: str, uri: str | None = None) -> tuple[str, str]:
    """Log `hf_dir` to the MLflow run of `step_dir`'s checkpoint and register it as a new version of `name`;
    returns ("models:/NAME/VERSION", the store's URI)."""
    import mlflow
    from mlflow.exceptions import MlflowException

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


def export_and_register(run_dir: Path, name: str) -> None:
    """The run's last checkpoint exported to `<run_dir>/hf/step_<n>` and registered as a new version of `name`,
    saying so on stdout as `pretrain export-hf --register` does."""
    step_dir, source = open_weights(run_dir)
    check(step_dir)
    out = export_checkpoint(step_dir, source, run_dir / HF_EXPORTS_DIR / step_dir.name)
    print(f"exported {step_dir} -> {out}")
    model, uri = register(out, step_dir, name)
    print(f"registered {model} in {uri}")
