"""The signal contract over a job's whole life, on the real 2-node cluster: `scancel --signal=USR1 --batch` (what
SLURM sends ahead of a time limit or a preemption) at start-up, in the early steps, at a step that saves and
evaluates, at the last step, and after `done:`; and SIGTERM to the step's processes in the early steps. Every job
ends COMPLETED (directly, or after its requeue), and its per-step losses are the uninterrupted run's, bit for bit.

The jobs run two at a time (each takes one CPU per node) and are signalled as each reaches its point.
"""
from __future__ import annotations

import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from slurm_helpers import (REPO, SBATCH, Cluster, FINAL_STATES, job_info, make_shards, read_jsonl, sbatch,
                           step_losses, torchrun, train_overrides)

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

STEPS = 12
# checkpoint every 2 steps, evaluate every 4 (on the training shards: the point is the timing, not the number)
EXTRA = ("checkpoint.every=2", "train.eval_every=4", "train.eval_steps=2", "train.log_every=1")


@dataclass
class Point:
    name: str
    steps_logged: int | None  # signal once metrics.jsonl has this many steps (None: on the output's `done:` line)
    requeued: bool | None  # whether the job must go through a requeue (None: either way, by timing)
    scancel: tuple[str, ...] = ("--signal=USR1", "--batch")  # the notice, to the batch shell
    job: str = ""
    run: Path = field(default_factory=Path)
    signalled: bool = False


POINTS = [
    Point("start-up", 0, requeued=None),  # the job runs; the ranks are starting (or srun is not up yet)
    Point("early steps", 1, requeued=True),
    Point("save and eval", 3, requeued=True),  # step 4 trains, evaluates and saves next
    Point("last step", STEPS - 1, requeued=None),  # lands before or after the last step's stop check
    Point("after done", None, requeued=False),  # the final checkpoint is committed: nothing to requeue
    # SIGTERM straight to the step's processes (launchers and ranks), as `scancel --signal=TERM` sends it
    Point("TERM to the steps", 2, requeued=True, scancel=("--signal=TERM",)),
]


def _reached(point: Point, cluster: Cluster, out: Path) -> bool:
    if point.steps_logged is None:
        return out.exists() and f"done: step {STEPS}" in out.read_text()
    if point.steps_logged == 0:
        return job_info(cluster, point.job)["JobState"] == "RUNNING"
    return len(read_jsonl(point.run / "metrics.jsonl")) >= point.steps_logged


def test_a_usr1_anywhere_in_a_jobs_life_ends_completed_with_the_uninterrupted_losses(slurm_cluster: Cluster,
                                                                                   tmp_path: Path) -> None:
    shards = make_shards(tmp_path / "data")
    config = str(REPO / "configs" / "debug.yaml")
    torchrun(2, ["-m", "pretrain", "train", "--config", config,
                 *train_overrides(shards, tmp_path / "local", STEPS, *EXTRA, tracking=False)], timeout=400)
    reference = step_losses(tmp_path / "local")
    assert sorted(reference) == list(range(1, STEPS + 1))

    for i, point in enumerate(POINTS):
        point.run = tmp_path / f"job{i}"
        point.job = sbatch(slurm_cluster, ["--nodes", "2", "--gpus-per-node=0", "--cpus-per-task=1", "--time=15",
                                           f"--output={tmp_path}/job{i}-%j.out", str(SBATCH), config,
                                           *train_overrides(shards, point.run, STEPS, *EXTRA)],
                           slurm_cluster.env())

    deadline = time.monotonic() + 900
    pending = list(POINTS)
    while pending:
        assert time.monotonic() < deadline, [(p.name, job_info(slurm_cluster, p.job)["JobState"]) for p in pending]
        for point in list(pending):
            out = tmp_path / f"job{POINTS.index(point)}-{point.job}.out"
            if not point.signalled and _reached(point, slurm_cluster, out):
                subprocess.run(["scancel", *point.scancel, point.job], env=slurm_cluster.env(), check=True)
                point.signalled = True
            info = job_info(slurm_cluster, point.job)
            if info["JobState"] in FINAL_STATES:
                assert point.signalled, f"{point.name}: the job ended before its point was reached"
                pending.remove(point)
        time.sleep(0.05)

    for i, point in enumerate(POINTS):
        info = job_info(slurm_cluster, point.job)
        log = (tmp_path / f"job{i}-{point.job}.out").read_text()
        assert info["JobState"] == "COMPLETED", f"{point.name}: {info['JobState']} ({info.get('ExitCode')})\n" \
                                                f"{log[-4000:]}"
        requeued = info["Restarts"] != "0"
        assert point.requeued in (None, requeued), f"{point.name}: Restarts={info['Restarts']}\n{log[-3000:]}"
        assert step_losses(point.run) == reference, f"{point.name}: losses differ from the uninterrupted run"
        segments = read_jsonl(point.run / "segments.jsonl")
        assert segments[-1]["end_step"] == STEPS and len(segments) == 1 + requeued, (point.name, segments)
        print(f"{point.name}: COMPLETED, restarts {info['Restarts']}, segments "
              f"{[(s['start_step'], s['end_step']) for s in segments]}")
