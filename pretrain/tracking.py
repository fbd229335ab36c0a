"""MLflow tracking from rank 0: params, tags, per-step metrics, artifacts; a resumed run continues its run id.

Store: `tracking.uri`, else $MLFLOW_TRACKING_URI, else a local SQLite store `<checkpoint.dir>/mlruns/mlflow.db`
with artifacts beside it. Not MLflow's `./mlruns` file store: MLflow 3.17 refuses it by default ("the filesystem
tracking backend is in maintenance mode ... migrate to a database backend (e.g. sqlite)").

No duplicate steps across a resume: MLflow cannot delete a metric point, so per-step metrics are buffered and
sent when a checkpoint commits (and at the end). MLflow then holds exactly the checkpointed history; steps
trained after the last checkpoint of a run that died are trained and logged again by the resumed run, once.
The live view is the log line and metrics.jsonl; MLflow lags it by at most `checkpoint.every` steps.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from pretrain.config import Config
from pretrain.resolved import ResolvedRun

_PARAM_MAX = 6000  # MLflow's limit on a param value's length
# The experiment tag MLflow 3's UI reads to choose an experiment's page: without it the UI opens on the GenAI
# overview (traces, evaluations), not on the runs table and charts. "custom_model_development" is what its
# "Machine learning" choice writes (mlflow/server/js: the experiment-kind enum; no Python constant exists).
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND_ML = "mlflow.experimentKind", "custom_model_development"


def tracking_uri(cfg: Config) -> str:
    if cfg.tracking.uri:
        return cfg.tracking.uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{(Path(cfg.checkpoint.dir).resolve() / 'mlruns' / 'mlflow.db').as_posix()}"


def ui_hint(uri: str) -> str:
    if uri.startswith(("http://", "https://")):
        return f"open {uri}"
    return f"mlflow ui --backend-store-uri {uri}"


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


class Tracker:
    """One MLflow run. Construct on rank 0 only (see `open_tracker`)."""

    def __init__(self, cfg: Config, run: ResolvedRun, *, resume_run_id: str | None,
                 resume_step: int | None) -> None:
        import mlflow  # imported here: ranks other than 0 never pay for it
        from mlflow.entities import Metric, Param, RunTag

        self._Metric, self._Param, self._RunTag = Metric, Param, RunTag
        self.uri = tracking_uri(cfg)
        if self.uri.startswith("sqlite:///"):
            Path(self.uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        self.client = mlflow.MlflowClient(tracking_uri=self.uri)
        self._buffer: list[Any] = []
        self._logged_up_to = 0  # steps <= this are already in the run (see `log_step`)
        layout = run.layout
        tags = {"git_commit": _git_commit(), "hostname": socket.gethostname(),
                "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
                "layout": f"world={layout.world} tp={layout.tp} pp={layout.pp} dp={layout.dp}",
                "global_batch": str(layout.global_batch)}
        if resume_run_id and self._exists(resume_run_id):
            self.run_id = resume_run_id
            self.client.update_run(self.run_id, status="RUNNING")
            history = self.client.get_metric_history(self.run_id, "loss")
            self._logged_up_to = max((m.step for m in history), default=0)
            tags[f"resumed_at_step_{resume_step}"] = time.strftime("%Y-%m-%dT%H:%M:%S")
            self._tags(tags)
            self.client.log_text(self.run_id, cfg.to_yaml(), f"config_resume_step_{resume_step}.yaml")
            return
        if resume_run_id:  # e.g. a checkpoint copied from another run dir whose local store stayed behind
            print(f"[tracking] the checkpoint's MLflow run {resume_run_id} is not in {self.uri}; starting a new "
                  f"run tagged forked_from_run={resume_run_id}", file=sys.stderr, flush=True)
            tags["forked_from_run"] = resume_run_id
            tags["forked_at_step"] = str(resume_step)
        exp = self.client.get_experiment_by_name(cfg.tracking.experiment)
        if exp is None:
            artifacts = None
            if self.uri.startswith("sqlite:///"):  # keep artifacts inside the run dir, not in the cwd
                artifacts = (Path(self.uri.removeprefix("sqlite:///")).parent / "artifacts").as_uri()
            exp_id = self.client.create_experiment(cfg.tracking.experiment, artifact_location=artifacts,
                                                   tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND_ML})
        else:
            exp_id = exp.experiment_id
            if EXPERIMENT_KIND_TAG not in exp.tags:  # made elsewhere without a kind; a kind someone chose stays
                self.client.set_experiment_tag(exp_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND_ML)
        name = cfg.tracking.run_name or Path(cfg.checkpoint.dir).resolve().name
        self.run_id = self.client.create_run(exp_id, run_name=name).info.run_id
        self._tags(tags)
        # The config as written, then what it resolved to: model.dim/n_layers/vocab_size are the model's real ones
        # (the config's None means "the flavor's" / "the tokenizer's"), plus layout, tokenizer and data facts.
        resolved = {**cfg.flat(), **run.flat()}
        params = [self._Param(k, str(v)[:_PARAM_MAX]) for k, v in resolved.items()]
        for i in range(0, len(params), 100):  # MLflow's batch limit is 100 params
            self.client.log_batch(self.run_id, params=params[i:i + 100])
        self.client.log_text(self.run_id, cfg.to_yaml(), "config.yaml")

    def _exists(self, run_id: str) -> bool:
        from mlflow.exceptions import MlflowException
        try:
            self.client.get_run(run_id)
            return True
        except MlflowException:
            return False

    def _tags(self, tags: dict[str, str | None]) -> None:
        self.client.log_batch(self.run_id, tags=[self._RunTag(k, v) for k, v in tags.items() if v is not None])

    def log_step(self, step: int, values: dict[str, float | None]) -> None:
        """Buffered; sent by `flush` (at a checkpoint commit or the end).

        Steps the run already holds are not sent again. That happens only when a resume fell back past a
        checkpoint that was committed (and flushed) but later found corrupt: MLflow cannot delete points, so
        the first attempt's points stay (on the same layout a replay recomputes the same values, unless the
        first attempt was hit by a transient fault); metrics.jsonl holds the replayed values.
        """
        if step <= self._logged_up_to:
            return
        ts = int(time.time() * 1000)
        self._buffer += [self._Metric(k, float(v), ts, step) for k, v in values.items() if v is not None]

    def flush(self) -> None:
        for i in range(0, len(self._buffer), 1000):  # MLflow's batch limit is 1000 metrics
            self.client.log_batch(self.run_id, metrics=self._buffer[i:i + 1000])
        self._buffer = []

    def discard(self) -> None:
        """Drop unsent steps (a failed run: they were never checkpointed, a resume will redo them)."""
        self._buffer = []

    def artifact_text(self, text: str, name: str) -> None:
        self.client.log_text(self.run_id, text, name)

    def finish(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status=status)


def open_tracker(cfg: Config, run: ResolvedRun, rank: int, *, resume_run_id: str | None = None,
                 resume_step: int | None = None) -> Tracker | None:
    if rank != 0 or not cfg.tracking.enabled:
        return None
    return Tracker(cfg, run, resume_run_id=resume_run_id, resume_step=resume_step)
