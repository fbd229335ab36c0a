"""Exact resume, as data: per layout, 2K steps straight vs stopped at K + resumed to 2K, bitwise-equal losses.

Both legs run the same config (max_steps = 2K, so the lr schedule is the same function). How the first leg stops
is part of the row: `checkpoint` loads the straight run's step-K checkpoint into a fresh run dir (what a run
stopped at K and restarted loads); `signal` is the preemption path for real -- SIGUSR1 to ONE rank mid-run, the
ranks agree at a step boundary, checkpoint, exit 42, and a second launch resumes from `latest` -- with MLflow
tracking into a real `mlflow server`, whose run must continue (one run id, every step exactly once).
CPU + gloo + fp32 is deterministic, so losses are compared with `==` (metrics.jsonl keeps full precision).
"""
from __future__ import annotations

import json
import subprocess
import sys
import time

import psutil
import pytest

from train_common import losses, tiny_shards, train_args
from spawn import REPO, child_env, torchrun
from pretrain.run.exits import EXIT_REQUEUE

K = 30

# (id, ranks, overrides, how the first leg stops). PP needs ZeRO <= 1 (DeepSpeed's rule).
LAYOUTS = [
    ("dp2_zero2", 2, ["parallel.zero_stage=2"], "signal"),
    ("tp2", 2, ["parallel.tp=2"], "checkpoint"),
    ("pp2", 2, ["parallel.pp=2", "parallel.zero_stage=1"], "checkpoint"),
]  # context parallelism's bitwise resume: tests/train/test_context_parallel_run.py


@pytest.fixture(scope="session")
def tmp_root(tmp_path_factory):
    return tmp_path_factory.mktemp("train")


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real MLflow tracking server on a free loopback port, SQLite backend in tmp; stopped at the end."""
    import socket
    import urllib.request

    root = tmp_path_factory.mktemp("mlflow")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                             "--workers", "1", "--backend-store-uri", f"sqlite:///{root}/mlflow.db",
                             "--artifacts-destination", (root / "artifacts").as_uri()],
                            stdout=open(root / "server.log", "w"), stderr=subprocess.STDOUT,
                            # no GenAI job runner: one more process importing MLflow, which tracking never uses
                            env=child_env(MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false"))
    uri = f"http://127.0.0.1:{port}"

    def wait_ready():
        deadline = time.time() + 120
        while time.time() < deadline:
            assert proc.poll() is None, (root / "server.log").read_text()[-3000:]
            try:
                urllib.request.urlopen(f"{uri}/health", timeout=2)
                return uri
            except OSError:
                time.sleep(0.5)
        raise TimeoutError("mlflow server did not come up")

    yield wait_ready
    proc.terminate()
    proc.wait(timeout=30)


def straight_run(tmp_root, row) -> "Path":  # noqa: F821
    layout_id, nproc, overrides, _ = row
    run = tmp_root / f"straight_{layout_id}"
    shards = tiny_shards(tmp_root / "data") / "shards"
    torchrun(nproc, train_args(shards, run, f"train.max_steps={2 * K}", f"checkpoint.every={K}", *overrides),
             timeout=300)
    return run


def _signal_one_rank_midrun(cmd: list[str], run_dir, rank: int = 1) -> subprocess.CompletedProcess:
    """Launch torchrun, wait until step 3 is logged, SIGUSR1 the worker with RANK=`rank` only."""
    proc = subprocess.Popen(cmd, cwd=REPO, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    metrics_file, deadline = run_dir / "metrics.jsonl", time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if metrics_file.exists() and len(metrics_file.read_text().splitlines()) >= 3:
            break
        time.sleep(0.02)
    workers = [p for p in psutil.Process(proc.pid).children(recursive=True)
               if p.environ().get("RANK") == str(rank) and "pretrain" in " ".join(p.cmdline())]
    assert len(workers) == 1, f"rank {rank} worker not found (run finished too early?)"
    workers[0].send_signal(__import__("signal").SIGUSR1)
    out, err = proc.communicate(timeout=240)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


@pytest.mark.distributed
@pytest.mark.parametrize("row", LAYOUTS, ids=[row[0] for row in LAYOUTS])
def test_resume_continues_the_exact_loss_curve(tmp_root, mlflow_server, row):
    layout_id, nproc, overrides, stop = row
    straight = straight_run(tmp_root, row)
    a = losses(straight)
    assert sorted(a) == list(range(1, 2 * K + 1))
    assert a[2 * K] < a[1] - 0.5, "the tiny model must visibly learn"
    shards = tiny_shards(tmp_root / "data") / "shards"
    resumed = tmp_root / f"resumed_{layout_id}"
    args = train_args(shards, resumed, f"train.max_steps={2 * K}", f"checkpoint.every={K}", *overrides)
    if stop == "checkpoint":
        proc = torchrun(nproc, args + ["--set", f"checkpoint.resume={straight / f'step_{K}'}"], timeout=300)
        assert f"resuming from {straight / f'step_{K}'} at step {K}" in proc.stderr
        b = losses(resumed)
        assert sorted(b) == list(range(K + 1, 2 * K + 1)), "the resumed run must start at step K+1"
        assert [b[s] for s in sorted(b)] == [a[s] for s in range(K + 1, 2 * K + 1)]
        return
    # stop == "signal": preempt, requeue-resume, and follow the MLflow run through it.
    uri = mlflow_server()
    args += ["--set", "tracking.enabled=true", "--set", f"tracking.uri={uri}", "--set", f"tracking.experiment={layout_id}"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *args]
    first = _signal_one_rank_midrun(cmd, resumed)
    assert first.returncode != 0
    assert f"exit {EXIT_REQUEUE} (requeue)" in first.stderr, first.stderr[-4000:]
    assert f"exitcode  : {EXIT_REQUEUE}" in first.stderr + first.stdout, "each worker exits with the requeue code"
    stopped_at = int(json.loads((resumed / "metrics.jsonl").read_text().splitlines()[-1])["step"])
    assert 3 <= stopped_at < 2 * K and (resumed / "latest").read_text().strip() == f"step_{stopped_at}"
    second = torchrun(nproc, args, timeout=300)
    assert f"resuming from {resumed / f'step_{stopped_at}'} at step {stopped_at}" in second.stderr
    b = losses(resumed)
    assert sorted(b) == list(range(1, 2 * K + 1))
    assert b == a, "signal -> checkpoint -> resume must reproduce the uninterrupted curve bit for bit"

    from mlflow import MlflowClient
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(layout_id)
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1, "a resumed run continues the same MLflow run"
    run = runs[0]
    assert run.info.status == "FINISHED"
    history = client.get_metric_history(run.info.run_id, "loss")
    assert sorted(m.step for m in history) == list(range(1, 2 * K + 1)), "every step logged exactly once"
    assert {m.step: m.value for m in history} == a
    assert run.data.params["parallel.zero_stage"] == "2" and run.data.tags["layout"] == "world=2 tp=1 cp=1 pp=1 dp=2"
    assert f"resumed_at_step_{stopped_at}" in run.data.tags
    arts = {f.path for f in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "summary.json"} <= arts
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development", "the UI opens on runs, not GenAI"
    summary = json.loads((resumed / "summary.json").read_text())
    assert [(g["start_step"], g["end_step"]) for g in summary["segments"]] == [(0, stopped_at), (stopped_at, 2 * K)]
    assert summary["wall_s"] == pytest.approx(sum(g["wall_s"] for g in summary["segments"]))
    assert min(g["wall_s"] for g in summary["segments"]) > 0
