"""slurm/pretrain.sbatch on a real two-node SLURM cluster, with the stand-in trainer (tests/slurm/fake_train.py).

Each test is what a user does: `sbatch --nodes 2 slurm/pretrain.sbatch CONFIG`, then reads the run directory.
The stand-in honours the real training command's contract (gloo all-reduce across ranks, metrics.jsonl,
USR1 -> checkpoint -> exit 42, resume from `latest`); PRETRAIN_TRAIN_CMD swaps in `-m pretrain train`.
"""
from __future__ import annotations

import re
import subprocess
import time

import pytest

from slurm_helpers import (FAKE_SEED, FAKE_STEPS, FAKE_TRAIN, SBATCH, Cluster, Watched, child_env, read_jsonl,
                           sbatch, watch, write_config)

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

MAX_STEPS = FAKE_STEPS
SEED = FAKE_SEED
# The batch script's #SBATCH defaults are for a GPU cluster; the local one has 2 CPUs per node and no GPUs.
LOCAL = ["--nodes", "2", "--gpus-per-node=0", "--cpus-per-task=1", "--time=10"]


def _job_env(cluster: Cluster, **extra: str) -> dict[str, str]:
    return cluster.env(PRETRAIN_TRAIN_CMD=str(FAKE_TRAIN), **extra)


def _usr1_mid_run(job: Watched) -> bool:
    return len(read_jsonl(job.run / "metrics.jsonl")) >= 5  # mid-run: ranks are up and stepping


@pytest.fixture(scope="module")
def jobs(slurm_cluster: Cluster, tmp_path_factory: pytest.TempPathFactory,
         fake_reference_in_background: object) -> dict[str, Watched]:
    """This module's three jobs, each test reading its own. The one that must fail fast runs alone first (its
    bound is a user's wait, not a share of a busy node's CPUs); the other two then run together. The USR1 job is signalled once 5 steps
    are logged, as a user does: what SLURM does ahead of a time limit (--signal=B:USR1@...) or a preemption,
    USR1 to the batch shell only."""
    tmp = tmp_path_factory.mktemp("sbatch")
    specs = {  # name: (config extra, job environment extra, trigger)
        "does not fit": ("parallel:\n  tp: 2\n  pp: 2\n", {}, None),  # tp x pp = 4 on 2 nodes x 1 rank
        "usr1": ("", {"FAKE_TRAIN_STEP_SECONDS": "0.25"}, _usr1_mid_run),
        "completion": ("", {}, None),
    }
    watched = []
    for name, (extra, env, trigger) in specs.items():
        d = tmp / name.replace(" ", "-")
        d.mkdir()
        cfg = write_config(d / "cfg.yaml", d / "run", max_steps=MAX_STEPS, seed=SEED, extra=extra)
        submitted = time.monotonic()
        job = sbatch(slurm_cluster, [*LOCAL, f"--output={d}/%x-%j.out", str(SBATCH), str(cfg)],
                     _job_env(slurm_cluster, **env))
        watched.append(Watched(name, job, d / f"pretrain-{job}.out", d / "run", reached=trigger,
                               submitted=submitted))
        if name == "does not fit":
            watch(slurm_cluster, watched[-1:], timeout=120)
    watch(slurm_cluster, watched[1:], timeout=400)
    return {w.name: w for w in watched}


def test_two_nodes_train_to_completion_like_a_local_run(jobs: dict[str, Watched], fake_reference: list[dict]) -> None:
    w = jobs["completion"]
    job, log = w.job, w.log()
    assert w.info["JobState"] == "COMPLETED", log

    assert read_jsonl(w.run / "metrics.jsonl") == fake_reference  # bitwise: same floats, same steps
    attempts = sorted(read_jsonl(w.run / "attempts.jsonl"), key=lambda a: a["rank"])
    # One rank per node, both nodes of the allocation, rendezvous at the first node on the job's port.
    assert [(a["rank"], a["world"], a["node"]) for a in attempts] == [(0, 2, "slurm-n1"), (1, 2, "slurm-n2")]
    assert {a["master"] for a in attempts} == {f"slurm-n1:{20000 + int(job) % 20000}"}
    assert "--nnodes 2 --node-rank 1 --master-addr slurm-n1" in log


def test_usr1_checkpoints_requeues_and_resumes_the_same_curve(jobs: dict[str, Watched],
                                                              fake_reference: list[dict]) -> None:
    w = jobs["usr1"]
    job, run, log = w.job, w.run, w.log()  # --open-mode=append: both runs' output
    assert w.signalled
    assert w.info["JobState"] == "COMPLETED", log
    assert w.info["Restarts"] == "1", log  # requeued once, same job id

    # The stopped run wrote steps 1..k, the requeued one k+1..MAX_STEPS: together exactly the uninterrupted curve.
    assert read_jsonl(run / "metrics.jsonl") == fake_reference
    attempts = read_jsonl(run / "attempts.jsonl")
    first = [a for a in attempts if a["restart_count"] == 0]
    second = [a for a in attempts if a["restart_count"] == 1]
    assert len(first) == len(second) == 2 and {a["job"] for a in attempts} == {job}
    resumed_at = {a["start_step"] for a in second}
    assert len(resumed_at) == 1 and 5 <= resumed_at.pop() < MAX_STEPS
    assert "scontrol requeue" in log and re.search(r"run 2 on slurm-n\[1-2\]", log)


def test_world_size_that_does_not_fit_fails_fast_with_one_line(jobs: dict[str, Watched]) -> None:
    # tp x pp = 4 cannot be split over 2 nodes x 1 rank.
    w = jobs["does not fit"]
    log = w.log()
    assert w.info["JobState"] == "FAILED" and w.info["ExitCode"] == "2:0", log
    errors = [line for line in log.splitlines() if line.startswith("launch: error:")]
    assert len(errors) == 2 and len(set(errors)) == 1, log  # one line, identical on each node
    assert "not divisible by tp x pp = 2 x 2" in errors[0] and "world size 2 (2 nodes x 1 per node)" in errors[0]
    # Nothing started: no rank wrote anything, torchrun never ran a rendezvous.
    assert not w.run.exists()
    assert "torch.distributed.run" not in log and "rendezvous" not in log.lower()
    assert w.ended - w.submitted < 60  # from sbatch to FAILED seen


def test_hostlist_parser_agrees_with_scontrol(slurm_cluster: Cluster) -> None:
    from launch.nodelist import parse_hostlist

    for expr in ["slurm-n[1-2]", "gpu[001-003,010],login1", "a[1-2]-b[3-4]", "node7"]:
        proc = subprocess.run(["scontrol", "show", "hostnames", expr], env=child_env(
            SLURM_CONF=str(slurm_cluster.conf)), capture_output=True, text=True, check=True)
        assert parse_hostlist(expr) == proc.stdout.split(), expr
