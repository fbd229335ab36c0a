"""The real `pretrain train` (debug model, DP=2 ZeRO-2, gloo) under slurm/pretrain.sbatch on the 2-node cluster.

The issue's acceptance, end to end: one rank per node trains to completion; a USR1 mid-run (what SLURM sends
ahead of a time limit or a preemption) checkpoints, exits 42, `scontrol requeue` brings the same job back, it
resumes from `latest`; the concatenated per-step losses equal a plain single-node 2-rank torchrun run bit for
bit, and MLflow holds one run with every step exactly once.

The job is the signal sweep's "save and eval" one (conftest.py: signal_sweep): USR1 once 3 of its 12 steps are
logged, with a checkpoint every 2 steps and an evaluation every 4 on the way; the reference is the sweep's.
"""
from __future__ import annotations

import pytest

from slurm_helpers import SWEEP_STEPS, Watched, step_losses

pytestmark = [pytest.mark.slurm, pytest.mark.slow]


def test_real_training_preempted_on_two_nodes_resumes_the_exact_local_curve(
        signal_sweep: dict[str, Watched], debug_reference: dict[int, float]) -> None:
    job = signal_sweep["save and eval"]
    run, info, log = job.run, job.info, job.log()
    assert job.signalled  # USR1 to the batch shell with 3 steps logged
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", log[-6000:]
    assert "scontrol requeue" in log and "resuming from" in log, log[-6000:]
    assert step_losses(run) == debug_reference  # both runs of the job together: the uninterrupted curve, bit for bit

    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{run / 'mlruns' / 'mlflow.db'}")
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    assert len(runs) == 1, "the requeued job continues the same MLflow run"
    history = client.get_metric_history(runs[0].info.run_id, "loss")
    assert sorted(m.step for m in history) == list(range(1, SWEEP_STEPS + 1))
