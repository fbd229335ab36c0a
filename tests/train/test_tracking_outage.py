"""Tracking never stops training: a real `mlflow server` that dies mid-run, or is not there at all.

The run keeps stepping at its own pace, says once that MLflow is away, ends on time with exit 0, and no step is
lost: the next launch on the same checkpoint.dir (here, one that finds the run already finished) sends MLflow
the committed steps it lacks from metrics.jsonl, into the same MLflow run, also when MLflow was already away when
a resumed launch started. A dry run names an unreachable tracking URI in one line."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from spawn import REPO, child_env
from train_common import tiny_shards, train_args

pytestmark = pytest.mark.slow

STEPS = 40
HALF = 20  # the first launch's steps: the server dies during them


class Server:
    """`mlflow server` on a fixed loopback port and SQLite file, so it can be stopped and started again.

    Without MLflow's job runner (MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false): GenAI job execution, which tracking
    never uses, is one more process importing MLflow at each start, on a 2-core machine that runs the ranks too."""

    def __init__(self, root: Path):
        self.root = root
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port), "--workers",
             "1", "--backend-store-uri", f"sqlite:///{self.root}/mlflow.db", "--artifacts-destination",
             (self.root / "artifacts").as_uri()],
            stdout=open(self.root / "server.log", "a"), stderr=subprocess.STDOUT,
            env=child_env(MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false"),
            start_new_session=True)  # its own process group: stop() takes the server's workers down with it
        deadline = time.time() + 120
        while time.time() < deadline:
            assert self.proc.poll() is None, (self.root / "server.log").read_text()[-3000:]
            try:
                urllib.request.urlopen(f"{self.uri}/health", timeout=2)
                return
            except OSError:
                time.sleep(0.3)
        raise TimeoutError("mlflow server did not come up")

    def stop(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)


def _steps(run: Path) -> int:
    path = run / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def _loss_steps(uri: str, experiment: str) -> list[int]:
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    assert len(runs) == 1, [r.info.run_id for r in runs]
    return sorted(m.step for m in client.get_metric_history(runs[0].info.run_id, "loss"))


def _dead_uri() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"  # nothing listens once the socket is closed


def test_a_server_that_dies_mid_run_costs_no_time_and_no_step_and_a_resume_while_it_is_away_stays_in_its_run(
        tmp_path):
    """Three launches on one run dir and one server: the server dies at step 8 of steps 1-HALF (the run goes on at
    its pace and ends on time); the launch resumed for steps HALF+1-STEPS while it is still away checkpoints the
    run id it resumed from; with the server back, a launch that finds the run finished continues that run and
    backfills it: one run in the experiment, holding every step."""
    server = Server(tmp_path)
    server.start()
    shards = tiny_shards(tmp_path / "data") / "shards"
    run = tmp_path / "run"

    def cmd(steps: int) -> list[str]:
        return [sys.executable, *train_args(shards, run, f"train.max_steps={steps}", "checkpoint.every=5",
                                            "tracking.enabled=true", f"tracking.uri={server.uri}",
                                            "tracking.experiment=outage")]

    proc = subprocess.Popen(cmd(HALF), cwd=REPO, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.monotonic() + 180
    while _steps(run) < 8:
        assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(0.05)
    server.stop()
    killed = time.monotonic()
    _, err = proc.communicate(timeout=240)
    after = time.monotonic() - killed
    assert proc.returncode == 0, err[-3000:]
    assert _steps(run) == HALF
    assert err.count("is unreachable") == 1, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    assert after < 90, f"the run took {after:.0f} s to finish after the server died"

    away = subprocess.run(cmd(STEPS), cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=300)
    assert away.returncode == 0 and "Traceback" not in away.stderr, away.stderr[-3000:]
    assert f"resuming from {run / f'step_{HALF}'}" in away.stderr, away.stderr[-3000:]
    assert "is unreachable" in away.stderr and _steps(run) == STEPS, away.stderr[-3000:]

    server.start()  # back: the next launch on the run sends what MLflow lacks, into the run it resumed from
    again = subprocess.run(cmd(STEPS), cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "Traceback" not in again.stderr, again.stderr[-3000:]
    assert "MLflow did not have" in again.stderr, again.stderr[-3000:]
    assert _loss_steps(server.uri, "outage") == list(range(1, STEPS + 1)), "one MLflow run, every step once"
    server.stop()


def test_an_unreachable_uri_at_start(tmp_path):
    shards = tiny_shards(tmp_path / "data") / "shards"
    dead = _dead_uri()
    args = train_args(shards, tmp_path / "run", "train.max_steps=6", "tracking.enabled=true",
                      f"tracking.uri={dead}")
    started = time.monotonic()
    dry = subprocess.run([sys.executable, *args, "--dry-run"], cwd=REPO, env=child_env(), capture_output=True,
                         text=True, timeout=120)
    assert dry.returncode == 2 and f"no MLflow server answers at {dead}" in dry.stderr, dry.stderr[-3000:]
    assert time.monotonic() - started < 60

    p = subprocess.run([sys.executable, *args], cwd=REPO, env=child_env(), capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0 and _steps(tmp_path / "run") == 6, p.stderr[-3000:]
    assert p.stderr.count("is unreachable") == 1 and "Traceback" not in p.stderr, p.stderr[-3000:]
