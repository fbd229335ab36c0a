"""slurm/pretrain.sbatch on a real two-node SLURM cluster, with the stand-in trainer (tests/slurm/fake_train.py).

Each test is what a user does: `sbatch --nodes 2 slurm/pretrain.sbatch CONFIG`, then reads the run directory.
The stand-in honours the real training command's contract (gloo all-reduce across ranks, metrics.jsonl,
USR1 -> checkpoint -> exit 42, resume from `latest`); PRETRAIN_TRAIN_CMD swaps in `-m pretrain train`.
"""
from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path

import pytest

from slurm_helpers import (FAKE_TRAIN, SBATCH, Cluster, child_env, job_info, read_jsonl, sbatch, torchrun,
                           wait_job, write_config)

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

MAX_STEPS = 40
SEED = 5
# The batch script's #SBATCH defaults are for a GPU cluster; the local one has 2 CPUs per node and no GPUs.
LOCAL = ["--nodes", "2", "--gpus-per-node=0", "--cpus-per-task=1", "--time=10"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    """The stand-in on one node, 2 ranks, plain torchrun: the losses every SLURM run must reproduce exactly."""
    tmp = tmp_path_factory.mktemp("reference")
    cfg = write_config(tmp / "cfg.yaml", tmp / "run", max_steps=MAX_STEPS, seed=SEED)
    torchrun(2, [str(FAKE_TRAIN), "--config", str(cfg)], timeout=300)
    metrics = read_jsonl(tmp / "run" / "metrics.jsonl")
    assert [m["step"] for m in metrics] == list(range(1, MAX_STEPS + 1))
    return metrics


def _job_env(cluster: Cluster, **extra: str) -> dict[str, str]:
    return cluster.env(PRETRAIN_TRAIN_CMD=str(FAKE_TRAIN), **extra)


def test_two_nodes_train_to_completion_like_a_local_run(slurm_cluster: Cluster, reference: list[dict],
                                                        tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "cfg.yaml", tmp_path / "run", max_steps=MAX_STEPS, seed=SEED)
    job = sbatch(slurm_cluster, [*LOCAL, f"--output={tmp_path}/%x-%j.out", str(SBATCH), str(cfg)],
                 _job_env(slurm_cluster))
    info = wait_job(slurm_cluster, job, timeout=180)
    log = (tmp_path / f"pretrain-{job}.out").read_text()
    assert info["JobState"] == "COMPLETED", log

    assert read_jsonl(tmp_path / "run" / "metrics.jsonl") == reference  # bitwise: same floats, same steps
    attempts = sorted(read_jsonl(tmp_path / "run" / "attempts.jsonl"), key=lambda a: a["rank"])
    # One rank per node, both nodes of the allocation, rendezvous at the first node on the job's port.
    assert [(a["rank"], a["world"], a["node"]) for a in attempts] == [(0, 2, "slurm-n1"), (1, 2, "slurm-n2")]
    assert {a["master"] for a in attempts} == {f"slurm-n1:{20000 + int(job) % 20000}"}
    assert "--nnodes 2 --node-rank 1 --master-addr slurm-n1" in log


def test_usr1_checkpoints_requeues_and_resumes_the_same_curve(slurm_cluster: Cluster, reference: list[dict],
                                                              tmp_path: Path) -> None:
    run = tmp_path / "run"
    cfg = write_config(tmp_path / "cfg.yaml", run, max_steps=MAX_STEPS, seed=SEED)
    job = sbatch(slurm_cluster, [*LOCAL, f"--output={tmp_path}/%x-%j.out", str(SBATCH), str(cfg)],
                 _job_env(slurm_cluster, FAKE_TRAIN_STEP_SECONDS="0.25"))
    deadline = time.monotonic() + 120
    while len(read_jsonl(run / "metrics.jsonl")) < 5:  # mid-run: ranks are up and stepping
        assert time.monotonic() < deadline, "the job never started stepping"
        assert job_info(slurm_cluster, job)["JobState"] in {"PENDING", "RUNNING"}
        time.sleep(0.2)
    # What SLURM does ahead of a time limit (--signal=B:USR1@...) or a preemption: USR1 to the batch shell only.
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], env=slurm_cluster.env(), check=True)

    info = wait_job(slurm_cluster, job, timeout=240)
    log = (tmp_path / f"pretrain-{job}.out").read_text()  # --open-mode=append: both runs' output
    assert info["JobState"] == "COMPLETED", log
    assert info["Restarts"] == "1", log  # requeued once, same job id

    # The stopped run wrote steps 1..k, the requeued one k+1..MAX_STEPS: together exactly the uninterrupted curve.
    assert read_jsonl(run / "metrics.jsonl") == reference
    attempts = read_jsonl(run / "attempts.jsonl")
    first = [a for a in attempts if a["restart_count"] == 0]
    second = [a for a in attempts if a["restart_count"] == 1]
    assert len(first) == len(second) == 2 and {a["job"] for a in attempts} == {job}
    resumed_at = {a["start_step"] for a in second}
    assert len(resumed_at) == 1 and 5 <= resumed_at.pop() < MAX_STEPS
    assert "scontrol requeue" in log and re.search(r"run 2 on slurm-n\[1-2\]", log)


def test_world_size_that_does_not_fit_fails_fast_with_one_line(slurm_cluster: Cluster, tmp_path: Path) -> None:
    # tp x pp = 4 cannot be split over 2 nodes x 1 rank.
    cfg = write_config(tmp_path / "cfg.yaml", tmp_path / "run", max_steps=MAX_STEPS, seed=SEED,
                       extra="parallel:\n  tp: 2\n  pp: 2\n")
    started = time.monotonic()
    job = sbatch(slurm_cluster, [*LOCAL, f"--output={tmp_path}/%x-%j.out", str(SBATCH), str(cfg)],
                 _job_env(slurm_cluster))
    info = wait_job(slurm_cluster, job, timeout=120)
    log = (tmp_path / f"pretrain-{job}.out").read_text()
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "2:0", log
    errors = [line for line in log.splitlines() if line.startswith("launch: error:")]
    assert len(errors) == 2 and len(set(errors)) == 1, log  # one line, identical on each node
    assert "not divisible by tp x pp = 2 x 2" in errors[0] and "world size 2 (2 nodes x 1 per node)" in errors[0]
    # Nothing started: no rank wrote anything, torchrun never ran a rendezvous.
    assert not (tmp_path / "run").exists()
    assert "torch.distributed.run" not in log and "rendezvous" not in log.lower()
    assert time.monotonic() - started < 60


def test_hostlist_parser_agrees_with_scontrol(slurm_cluster: Cluster) -> None:
    from launch.nodelist import parse_hostlist

    for expr in ["slurm-n[1-2]", "gpu[001-003,010],login1", "a[1-2]-b[3-4]", "node7"]:
        proc = subprocess.run(["scontrol", "show", "hostnames", expr], env=child_env(
            SLURM_CONF=str(slurm_cluster.conf)), capture_output=True, text=True, check=True)
        assert parse_hostlist(expr) == proc.stdout.split(), expr
