"""The real `pretrain train` (debug model, DP=2 ZeRO-2, gloo) under slurm/pretrain.sbatch on the 2-node cluster.

The issue's acceptance, end to end: one rank per node trains to completion; a USR1 mid-run (what SLURM sends
ahead of a time limit or a preemption) checkpoints, exits 42, `scontrol requeue` brings the same job back, it
resumes from `latest`; the concatenated per-step losses equal a plain single-node 2-rank torchrun run bit for
bit, and MLflow holds one run with every step exactly once.
"""
from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from slurm_helpers import (REPO, SBATCH, Cluster, job_info, make_shards, read_jsonl, sbatch, step_losses, torchrun,
                           train_overrides, wait_job)

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

STEPS = 150


def test_real_training_preempted_on_two_nodes_resumes_the_exact_local_curve(slurm_cluster: Cluster,
                                                                            tmp_path: Path) -> None:
    shards = make_shards(tmp_path / "data")
    config = str(REPO / "configs" / "debug.yaml")
    local = train_overrides(shards, tmp_path / "local", STEPS, tracking=False)  # tracking does not change the losses
    torchrun(2, ["-m", "pretrain", "train", "--config", config, *local], timeout=400)
    reference = step_losses(tmp_path / "local")
    assert sorted(reference) == list(range(1, STEPS + 1))

    run = tmp_path / "slurm"
    job = sbatch(slurm_cluster, ["--nodes", "2", "--gpus-per-node=0", "--cpus-per-task=1", "--time=15",
                                 f"--output={tmp_path}/%x-%j.out", str(SBATCH), config, *train_overrides(shards, run, STEPS)],
                 slurm_cluster.env())
    deadline = time.monotonic() + 240
    while len(read_jsonl(run / "metrics.jsonl")) < 3:
        assert time.monotonic() < deadline, "the job never started stepping"
        assert job_info(slurm_cluster, job)["JobState"] in {"PENDING", "RUNNING"}, job_info(slurm_cluster, job)
        time.sleep(0.1)
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], env=slurm_cluster.env(), check=True)

    info = wait_job(slurm_cluster, job, timeout=400)
    log = (tmp_path / f"pretrain-{job}.out").read_text()
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", log[-6000:]
    assert "scontrol requeue" in log and "resuming from" in log, log[-6000:]
    assert step_losses(run) == reference  # both runs of the job together: the uninterrupted curve, bit for bit

    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{run / 'mlruns' / 'mlflow.db'}")
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    assert len(runs) == 1, "the requeued job continues the same MLflow run"
    history = client.get_metric_history(runs[0].info.run_id, "loss")
    assert sorted(m.step for m in history) == list(range(1, STEPS + 1))
