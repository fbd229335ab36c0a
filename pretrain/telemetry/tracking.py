"""MLflow tracking from rank 0: params, tags, per-step metrics, artifacts; a resumed run continues its run id.

Store: `tracking.uri`, else $MLFLOW_TRACKING_URI, else a local SQLite store `<checkpoint.dir>/mlruns/mlflow.db`
with artifacts beside it. Not MLflow's `./mlruns` file store: MLflow 3.17 refuses it by default ("the filesystem
tracking backend is in maintenance mode ... migrate to a database backend (e.g. sqlite)").

No duplicate steps across a resume: MLflow cannot delete a metric point, so per-step metrics are buffered and
sent when a checkpoint commits (and at the end). MLflow then holds exactly the checkpointed history; steps
trained after the last checkpoint of a run that died are trained and logged again by the resumed run, once.
The live view is the log line and metrics.jsonl; MLflow lags it by at most `checkpoint.every` steps.

Tracking never stops training. Every MLflow call runs on one background thread, in order, with short HTTP
timeouts and no retries of MLflow's own (its defaults, 7 retries with backoff and a 120 s timeout, stalled a
run for minutes when the server went away). When the server cannot be reached the thread says so once, keeps
the calls queued and tries again with backoff; training goes on, metrics.jsonl has every step, and the queue is
sent when the server is back. Whatever is still queued when the process ends is not lost either: the next
launch on this checkpoint.dir compares MLflow's history with metrics.jsonl and sends the committed steps MLflow
lacks (a backfill), also when the outage began in an earlier segment. Into the same run: each checkpoint records
the run id, and a launch resumed while MLflow is away records the id it resumed from until its tracker opens
(`checkpoint_run_id`).
"""
from __future__ import annotations

import collections
import os
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Callable

from pretrain.config import Config
from pretrain.console import say
from pretrain.output_dir import nearest_existing
from pretrain.run.paths import CONFIG, MLFLOW_DB, MLFLOW_DIR
from pretrain.run.resolved import ResolvedRun

_PARAM_MAX = 6000  # MLflow's limit on a param value's length
# The experiment tag MLflow 3's UI reads to choose an experiment's page: without it the UI opens on the GenAI
# overview (traces, evaluations), not on the runs table and charts. "custom_model_development" is what its
# "Machine learning" choice writes (MLflow 3.x's UI enum of experiment kinds; no Python constant exists).
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND_ML = "mlflow.experimentKind", "custom_model_development"
# The per-step values sent to MLflow, under metrics.jsonl's names.
STEP_METRICS = ("loss", "z_loss", "lr", "grad_norm", "tokens_per_s", "tflops", "mfu", "peak_mem_gib", "val_loss",
                "val_ppl", "val_bpb", "skipped", "tokens", "step_time_s", "data_wait_s", "mem_allocated_gib",
                "mem_reserved_gib", "eta_s", "loss_z", "grad_norm_z", "rollbacks", "straggler_rank", "straggler_ratio",
                "compute_median_s", "ckpt_step", "ckpt_pause_s", "ckpt_save_s", "ckpt_bytes", "ckpt_gbps",
                "ckpt_load_s")
HTTP_TIMEOUT_S = "10"  # per MLflow request (MLFLOW_HTTP_REQUEST_TIMEOUT); set in the environment to change
RETRY_MAX_S = 30.0  # the longest wait between two attempts while the server is away
CLOSE_WAIT_S = 30.0  # how long the end of a run waits for the queue to drain before leaving it to a backfill


def tracking_uri(cfg: Config, run_dir: str | Path | None = None) -> str:
    """`run_dir`: where the default SQLite store lives when it is not cfg.checkpoint.dir as seen from here (a
    checkpoint read later, from another working directory)."""
    if cfg.tracking.uri:
        return cfg.tracking.uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{(Path(run_dir or cfg.checkpoint.dir).resolve() / MLFLOW_DIR / MLFLOW_DB).as_posix()}"


def ui_hint(uri: str) -> str:
    if uri.startswith(("http://", "https://")):
        return f"open {uri}"
    return f"mlflow ui --backend-store-uri {uri}"


def check_uri(uri: str, timeout_s: float = 5.0) -> str | None:
    """Why `uri` cannot be tracked to, in a few seconds at most; None when it can (a server answers /health, or a
    SQLite store's directory is writable)."""
    if uri.startswith(("http://", "https://")):
        import urllib.request

        try:
            urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout_s)
            return None
        except OSError as e:
            return f"no MLflow server answers at {uri} ({getattr(e, 'reason', e)})"
    if uri.startswith("sqlite:///"):
        folder = nearest_existing(Path(uri.removeprefix("sqlite:///")).parent)
        return None if os.access(folder, os.W_OK) else f"{folder} is not writable (tracking store {uri})"
    return None


def step_values(record: dict[str, Any]) -> dict[str, float]:
    """A metrics.jsonl record (or a StepRecord's fields) -> the numbers MLflow gets for that step."""
    out = {}
    for key in STEP_METRICS:
        v = record.get(key)
        if v is None:
            continue
        try:
            out[key] = float(v)  # "nan"/"inf" strings (a skipped step's loss) become floats again
        except (TypeError, ValueError):
            continue
    for name, v in (record.get("downstream") or {}).items():  # eval.tasks: "eval/<task>/<metric>"
        if isinstance(v, (int, float)):
            out[f"eval/{name}"] = float(v)
    return out


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _say(msg: str) -> None:
    say(msg, topic="tracking")


class Tracker:
    """One MLflow run. Construct on rank 0 only (see `open_tracker`). Calls return at once; the work is queued."""

    def __init__(self, cfg: Config, run: ResolvedRun, *, resume_run_id: str | None, resume_step: int | None,
                 history: list[dict[str, Any]] = ()) -> None:
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # our thread retries, without blocking
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", HTTP_TIMEOUT_S)
        import mlflow  # imported here: ranks other than 0 never pay for it
        from mlflow.entities import Metric, Param, RunTag

        self._Metric, self._Param, self._RunTag = Metric, Param, RunTag
        self.uri = tracking_uri(cfg)
        if self.uri.startswith("sqlite:///"):
            Path(self.uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        self.client = mlflow.MlflowClient(tracking_uri=self.uri)
        self.run_id: str | None = None  # known once the run is created or found (the first queued call)
        self._created: str | None = None
        self._buffer: list[Any] = []
        self._logged_up_to = 0  # steps <= this are already in the run (see `log_step`)
        self._queue: collections.deque[tuple[str, Callable[[], None]]] = collections.deque()
        self._cv = threading.Condition()
        self._busy = False
        self._down_since: float | None = None
        self._closing = False
        self._call("open the run", lambda: self._open(cfg, run, resume_run_id, resume_step, list(history)))
        self._thread = threading.Thread(target=self._work, name="mlflow-tracker", daemon=True)
        self._thread.start()
        # The run id goes into every checkpoint (a resume continues the run), so wait for the run to open, unless
        # the first attempt fails: then training starts at once and the thread keeps trying.
        deadline = time.monotonic() + 2 * float(os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"])
        with self._cv:
            while self.run_id is None and self._down_since is None and time.monotonic() < deadline:
                self._cv.wait(0.05)

    # ------------------------------------------------------------------------------------- the worker

    def _call(self, what: str, fn: Callable[[], None]) -> None:
        with self._cv:
            self._queue.append((what, fn))
            self._cv.notify()

    def _work(self) -> None:
        wait = 1.0
        while True:
            with self._cv:
                while not self._queue:
                    self._busy = False
                    self._cv.notify_all()
                    self._cv.wait()
                self._busy = True
                what, fn = self._queue[0]
            try:
                fn()
            except Exception as e:  # noqa: BLE001 - whatever MLflow raises, training must go on
                if not _transient(e):
                    _say(f"MLflow refused to {what} ({_reason(e)}); skipped")
                    self._pop()
                    continue
                if self._down_since is None:
                    self._down_since = time.monotonic()
                    _say(f"MLflow at {self.uri} is unreachable ({_reason(e)}); training goes on, every step is in "
                         f"metrics.jsonl, and MLflow gets them when it is back")
                with self._cv:  # woken early by `finish`, which then retries every 2 s while it waits
                    self._cv.wait(min(wait, 2.0) if self._closing else wait)
                wait = min(wait * 2, RETRY_MAX_S)
                continue
            if self._down_since is not None:
                _say(f"MLflow at {self.uri} is back after {time.monotonic() - self._down_since:.0f} s; sending "
                     f"what was queued ({len(self._queue)} call(s))")
                self._down_since = None
            wait = 1.0
            self._pop()

    def _pop(self) -> None:
        with self._cv:
            self._queue.popleft()

    # ------------------------------------------------------------------------------------ MLflow calls

    def _open(self, cfg: Config, run: ResolvedRun, resume_run_id: str | None, resume_step: int | None,
              history: list[dict[str, Any]]) -> None:
        layout = run.layout
        tags = {"git_commit": _git_commit(), "hostname": socket.gethostname(),
                "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
                "layout": f"world={layout.world} tp={layout.tp} cp={layout.cp} pp={layout.pp} dp={layout.dp}",
                "global_batch": str(layout.global_batch)}
        if resume_run_id and self._exists(resume_run_id):
            self.client.update_run(resume_run_id, status="RUNNING")
            logged = self.client.get_metric_history(resume_run_id, "loss")
            self._logged_up_to = max((m.step for m in logged), default=0)
            tags[f"resumed_at_step_{resume_step}"] = time.strftime("%Y-%m-%dT%H:%M:%S")
            self._tags(resume_run_id, tags)
            self.client.log_text(resume_run_id, cfg.to_yaml(), f"config_resume_step_{resume_step}.yaml")
            self.run_id = resume_run_id
        else:
            if resume_run_id:  # e.g. a checkpoint copied from another run dir whose local store stayed behind
                _say(f"the checkpoint's MLflow run {resume_run_id} is not in {self.uri}; starting a new run tagged "
                     f"forked_from_run={resume_run_id}")
                tags["forked_from_run"] = resume_run_id
                tags["forked_at_step"] = str(resume_step)
            if self._created is None:  # a retry after a later call failed must not make a second run
                self._created = self.client.create_run(self._experiment(cfg), run_name=cfg.tracking.run_name
                                                       or Path(cfg.checkpoint.dir).resolve().name).info.run_id
            run_id = self.run_id = self._created  # known now, not after the params: checkpoints record it sooner
            self._tags(run_id, tags)
            # The config as written, then what it resolved to: model.dim/n_layers/vocab_size are the model's real
            # ones (the config's None means "the flavor's" / "the tokenizer's"), plus layout, tokenizer and data.
            resolved = {**cfg.flat(), **run.flat()}
            params = [self._Param(k, str(v)[:_PARAM_MAX]) for k, v in resolved.items()]
            for i in range(0, len(params), 100):  # MLflow's batch limit is 100 params
                self.client.log_batch(run_id, params=params[i:i + 100])
            self.client.log_text(run_id, cfg.to_yaml(), CONFIG)
        # Committed steps MLflow lacks (sent from metrics.jsonl): an outage in an earlier segment, or a new run
        # forked from a checkpoint whose MLflow run is elsewhere.
        missing = [r for r in history if r.get("step", 0) > self._logged_up_to]
        if missing:
            self._send([self._Metric(k, v, int(time.time() * 1000), int(r["step"]))
                        for r in missing for k, v in step_values(r).items()])
            _say(f"sent {len(missing)} committed step(s) MLflow did not have (steps {missing[0]['step']}-"
                 f"{missing[-1]['step']}, from metrics.jsonl)")
            self._logged_up_to = int(missing[-1]["step"])

    def _experiment(self, cfg: Config) -> str:
        exp = self.client.get_experiment_by_name(cfg.tracking.experiment)
        if exp is None:
            artifacts = None
            if self.uri.startswith("sqlite:///"):  # keep artifacts inside the run dir, not in the cwd
                artifacts = (Path(self.uri.removeprefix("sqlite:///")).parent / "artifacts").as_uri()
            return self.client.create_experiment(cfg.tracking.experiment, artifact_location=artifacts,
                                                 tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND_ML})
        if EXPERIMENT_KIND_TAG not in exp.tags:  # made elsewhere without a kind; a kind someone chose stays
            self.client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND_ML)
        return exp.experiment_id

    def _exists(self, run_id: str) -> bool:
        from mlflow.exceptions import MlflowException
        try:
            self.client.get_run(run_id)
            return True
        except MlflowException as e:
            if _transient(e):
                raise
            return False

    def _tags(self, run_id: str, tags: dict[str, str | None]) -> None:
        self.client.log_batch(run_id, tags=[self._RunTag(k, v) for k, v in tags.items() if v is not None])

    def _send(self, batch: list[Any]) -> None:
        for i in range(0, len(batch), 1000):  # MLflow's batch limit is 1000 metrics
            self.client.log_batch(self.run_id, metrics=batch[i:i + 1000])

    # ---------------------------------------------------------------------------- the training's side

    def log_step(self, step: int, values: dict[str, float | None]) -> None:
        """Buffered; queued by `flush` (at a checkpoint commit or the end).

        Steps the run already holds are not sent again. That happens only when a resume fell back past a
        checkpoint that was committed (and flushed) but later found corrupt: MLflow cannot delete points, so
        the first attempt's points stay (on the same layout a replay recomputes the same values, unless the
        first attempt was hit by a transient fault); metrics.jsonl holds the replayed values.
        """
        ts = int(time.time() * 1000)
        self._buffer.append((step, [(k, float(v), ts) for k, v in values.items() if v is not None]))

    def flush(self, up_to: int | None = None) -> None:
        """Queue the buffered steps (those <= up_to: the ones a committed checkpoint covers)."""
        buffered = [b for b in self._buffer if up_to is None or b[0] <= up_to]
        self._buffer = [b for b in self._buffer if up_to is not None and b[0] > up_to]

        def send() -> None:
            self._send([self._Metric(k, v, ts, step) for step, row in buffered if step > self._logged_up_to
                        for k, v, ts in row])
        if buffered:
            self._call(f"log steps {buffered[0][0]}-{buffered[-1][0]}", send)

    def discard(self) -> None:
        """Drop unsent steps (a failed run: they were never checkpointed, a resume will redo them)."""
        self._buffer = []

    def rolled_back(self, record: dict[str, Any]) -> None:
        """A spike rollback (pretrain/train/rollback.py): the steps after the restored one are trained again, so they
        are dropped here and logged anew; the per-step `rollbacks` metric counts them, a tag per rollback says what
        happened. MLflow cannot delete points: steps a discarded checkpoint had committed (a save inside the spike's
        window) keep their first values beside the new ones."""
        self._buffer = []
        self._logged_up_to = min(self._logged_up_to, int(record["restored_step"]))
        n, step = int(record["rollback"]), int(record["detected_at"])
        note = (f"spike at steps {record['first_step']}-{step} (loss z {record['loss_z']:.1f}, grad norm z "
                f"{record['grad_norm_z']:.1f}): restored step "
                f"{record['restored_step']}, skipped {record['skipped_batches']} batches")
        tags = {f"rollback_{n}": note, "rollbacks": str(n)}
        self._call(f"record rollback {n}", lambda: self._tags(self.run_id, tags))

    def artifact_dir(self, local_dir: Path, artifact_path: str) -> None:
        self._call(f"log {local_dir}", lambda: self.client.log_artifacts(self.run_id, str(local_dir), artifact_path))

    def artifact_text(self, text: str, name: str) -> None:
        self._call(f"log {name}", lambda: self.client.log_text(self.run_id, text, name))

    def finish(self, status: str = "FINISHED", wait_s: float = CLOSE_WAIT_S) -> None:
        """Queue the run's end, then wait up to wait_s for the queue to drain (a server that is away gets the
        rest from the next launch's backfill)."""
        self._call(f"mark the run {status}", lambda: self.client.set_terminated(self.run_id, status=status))
        if self._down_since is not None:  # away already: do not hold the exit for long
            wait_s = min(wait_s, 5.0)
        deadline = time.monotonic() + wait_s
        with self._cv:
            self._closing = True
            self._cv.notify_all()
            while (self._queue or self._busy) and time.monotonic() < deadline:
                self._cv.wait(0.2)
            left = len(self._queue)
        if left:
            _say(f"MLflow at {self.uri} is still unreachable; {left} call(s) not sent. metrics.jsonl has every "
                 f"step, and the next launch on this checkpoint.dir sends the committed ones MLflow lacks")


def _transient(e: BaseException) -> bool:
    """An error that says the store cannot be reached now (worth retrying), not that MLflow rejected a call."""
    if isinstance(e, (OSError, TimeoutError, ConnectionError)):
        return True
    if type(e).__module__.startswith(("requests", "urllib3")):
        return True
    text = str(e)
    return any(s in text for s in ("Max retries exceeded", "Connection refused", "timed out", "failed with exception",
                                   "database is locked", "503", "502", "504"))


def _reason(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text[:200] + ("..." if len(text) > 200 else "")


def system_metrics(run_id: str, uri: str, interval_s: float, node: int) -> Any:
    """MLflow's own system-metrics thread for this node, into the run: CPU and host memory, disk, network, and
    with NVML (`pip install 'pretrain[gpu-metrics]'`) each GPU's utilisation and memory, under
    `system/node<N>/...`, one sample every interval_s. Started on each node's first rank; `.finish()` stops it."""
    import logging

    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    logging.getLogger("mlflow.system_metrics").setLevel(logging.ERROR)  # e.g. "no NVML" on CPU hosts
    monitor = SystemMetricsMonitor(run_id, sampling_interval=interval_s, node_id=f"node{node}", tracking_uri=uri,
                                   resume_logging=True)
    monitor.start()
    return monitor


def checkpoint_run_id(tracker: Tracker | None, resumed_run_id: str | None) -> str | None:
    """The MLflow run id a checkpoint records: the tracker's once its run is open, until then (MLflow unreachable
    since the start of a resumed launch, or tracking off in this launch) the one the launch resumed from. A null
    there would make the next healthy launch start a new MLflow run; with it, that launch continues the run and
    backfills the steps it lacks."""
    return (tracker.run_id if tracker else None) or resumed_run_id


def open_tracker(cfg: Config, run: ResolvedRun, rank: int, *, resume_run_id: str | None = None,
                 resume_step: int | None = None, history: list[dict[str, Any]] = ()) -> Tracker | None:
    """rank 0's tracker (None elsewhere or with tracking off). `history`: metrics.jsonl's committed records, for
    the backfill."""
    if rank != 0 or not cfg.tracking.enabled:
        return None
    return Tracker(cfg, run, resume_run_id=resume_run_id, resume_step=resume_step, history=history)
