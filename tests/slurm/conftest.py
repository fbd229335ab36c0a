"""A real two-node SLURM cluster for the session (scripts/slurm_cluster.sh), started once and stopped at the end,
and the runs several modules read, each made once per session (tests/shared.py: once across pytest-xdist workers
too): the prepared debug shards, the uninterrupted local reference runs, and the signal sweep's jobs.

The cluster needs root (apt-get for Debian's slurm-wlm + munge, the daemons, /etc/hosts entries); that is the only
reason to skip. In CI we are root, so there a cluster that fails to start is a test failure, never a skip.
Under `make test` every module here runs on one pytest-xdist worker (tests/conftest.py): one worker, one cluster.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

import pytest

from shared import built_once
from slurm_helpers import (DEBUG_CONFIG, FAKE_SEED, FAKE_STEPS, FAKE_TRAIN, SBATCH, SCRIPT, SWEEP_EXTRA,
                           SWEEP_POINTS, SWEEP_STEP_SECONDS, SWEEP_STEPS, Cluster, Watched, make_shards, read_jsonl,
                           sbatch, step_losses, torchrun, train_overrides, watch, write_config)


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[Cluster]:
    if os.geteuid() != 0:
        pytest.skip("the local SLURM cluster needs root (apt-get install slurm-wlm munge, daemons, /etc/hosts)")
    if shutil.which("slurmctld") is None and shutil.which("apt-get") is None:
        pytest.skip("SLURM is not installed and apt-get is unavailable to install Debian's slurm-wlm")
    started = time.monotonic()
    proc = subprocess.run([str(SCRIPT), "start"], capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        pytest.fail(f"scripts/slurm_cluster.sh start failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    print(f"\nlocal SLURM cluster up in {time.monotonic() - started:.1f} s: {proc.stderr.strip()}")
    conf = Path(subprocess.run([str(SCRIPT), "env"], capture_output=True, text=True, check=True)
                .stdout.strip().split("=", 1)[1])
    try:
        yield Cluster(conf)
    finally:
        subprocess.run([str(SCRIPT), "stop"], capture_output=True, text=True, timeout=120)


def in_background(build: Callable[[], object]) -> threading.Thread:
    """Start a shared build (a local reference run) while the cluster's jobs run: the CPUs are idle in their gaps
    (start-up waits, a requeued job's 11 s hold). An error is left to the fixture that reads the build: `built_once`
    builds again there and fails in that test."""
    def run() -> None:
        try:
            build()
        except BaseException:  # noqa: BLE001  (reported by the reading fixture, see above)
            pass
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


@pytest.fixture(scope="session")
def debug_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Corpus -> BPE tokenizer -> shards (`pretrain-data`), the data of every real `pretrain train` run here."""
    return built_once(tmp_path_factory, "slurm-debug-shards", make_shards) / "shards"


def _debug_reference_run(tmp_path_factory: pytest.TempPathFactory, shards: Path) -> Path:
    """Plain single-node 2-rank torchrun of the sweep's configuration, uninterrupted (tracking does not change the
    losses, so it is off here and on in the jobs)."""
    def build(out: Path) -> None:
        torchrun(2, ["-m", "pretrain", "train", "--config", DEBUG_CONFIG,
                     *train_overrides(shards, out / "run", SWEEP_STEPS, *SWEEP_EXTRA, tracking=False)], timeout=400)
    return built_once(tmp_path_factory, "slurm-debug-reference", build) / "run"


@pytest.fixture(scope="session")
def debug_reference(tmp_path_factory: pytest.TempPathFactory, debug_shards: Path) -> dict[int, float]:
    """The uninterrupted local run's per-step losses, which every SLURM job of the sweep must reproduce exactly."""
    reference = step_losses(_debug_reference_run(tmp_path_factory, debug_shards))
    assert sorted(reference) == list(range(1, SWEEP_STEPS + 1))
    return reference


@pytest.fixture(scope="session")
def signal_sweep(slurm_cluster: Cluster, debug_shards: Path,
                 tmp_path_factory: pytest.TempPathFactory) -> dict[str, Watched]:
    """One real `pretrain train` job per SWEEP_POINTS entry, all submitted at once (they run two at a time: each
    takes one of the two CPUs per node), each signalled as it reaches its point; by point name, once all are
    final. The local reference run is made meanwhile."""
    tmp = tmp_path_factory.mktemp("signal-sweep")
    reference = in_background(lambda: _debug_reference_run(tmp_path_factory, debug_shards))
    jobs = []
    # Submitted (so started) in this order: the points that must requeue first, the ones that never do last, so
    # the sweep's tail is one single-run job rather than a run, the requeue hold and a second run on an idle node.
    order = sorted(range(len(SWEEP_POINTS)), key=lambda i: {True: 0, None: 1, False: 2}[SWEEP_POINTS[i].requeued])
    for i in order:
        point = SWEEP_POINTS[i]
        run = tmp / f"job{i}"
        job = sbatch(slurm_cluster, ["--nodes", "2", "--gpus-per-node=0", "--cpus-per-task=1", "--time=15",
                                     f"--output={tmp}/job{i}-%j.out", str(SBATCH), DEBUG_CONFIG,
                                     *train_overrides(debug_shards, run, SWEEP_STEPS, *SWEEP_EXTRA)],
                     slurm_cluster.env(PRETRAIN_INJECT_STEP_SECONDS=SWEEP_STEP_SECONDS))
        jobs.append(Watched(point.name, job, tmp / f"job{i}-{job}.out", run, reached=point.reached,
                            scancel=point.scancel))
    watch(slurm_cluster, jobs, timeout=900)
    reference.join()
    return {w.name: w for w in jobs}


def _fake_reference_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The stand-in on one node, 2 ranks, plain torchrun, uninterrupted."""
    def build(out: Path) -> None:
        cfg = write_config(out / "cfg.yaml", out / "run", max_steps=FAKE_STEPS, seed=FAKE_SEED)
        torchrun(2, [str(FAKE_TRAIN), "--config", str(cfg)], timeout=300)
    return built_once(tmp_path_factory, "slurm-fake-reference", build) / "run"


@pytest.fixture(scope="session")
def fake_reference(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    """The stand-in's metrics.jsonl records that every interrupted or SLURM run of it must reproduce exactly."""
    metrics = read_jsonl(_fake_reference_run(tmp_path_factory) / "metrics.jsonl")
    assert [m["step"] for m in metrics] == list(range(1, FAKE_STEPS + 1))
    return metrics


@pytest.fixture(scope="session")
def fake_reference_in_background(tmp_path_factory: pytest.TempPathFactory) -> threading.Thread:
    """Starts the stand-in's reference run without waiting for it (`fake_reference` waits)."""
    return in_background(lambda: _fake_reference_run(tmp_path_factory))
