"""Helpers for the SLURM tests: the cluster handle and submit/wait."""
from __future__ import annotations

import json
import random
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from spawn import child_env, torchrun  # noqa: F401  (re-exported to the slurm tests)

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "slurm_cluster.sh"
SBATCH = REPO / "slurm" / "pretrain.sbatch"
DEBUG_CONFIG = str(REPO / "configs" / "debug.yaml")
FAKE_TRAIN = Path(__file__).with_name("fake_train.py")
# The stand-in's run that the fake-trainer tests (test_sbatch.py, test_launch_signals.py) reproduce: one shared
# uninterrupted reference (conftest.py: fake_reference).
FAKE_STEPS = 40
FAKE_SEED = 5
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                "DEADLINE", "PREEMPTED"}


@dataclass(frozen=True)
class Cluster:
    conf: Path
    nodes: tuple[str, ...] = ("slurm-n1", "slurm-n2")

    def env(self, **extra: str) -> dict[str, str]:
        """Environment for sbatch/scontrol; sbatch exports it to the job (PYTHON, stand-in command, ...)."""
        return child_env(SLURM_CONF=str(self.conf), PYTHON=sys.executable, **extra)


def sbatch(cluster: Cluster, args: list[str], env: dict[str, str]) -> str:
    """Submit; returns the job id."""
    proc = subprocess.run(["sbatch", "--parsable", *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, f"sbatch failed: {proc.stderr}"
    return proc.stdout.strip().split(";")[0]


def job_info(cluster: Cluster, job_id: str) -> dict[str, str]:
    """`scontrol show job` as a dict (JobState, Restarts, ExitCode, ...); the cluster keeps jobs 10 min."""
    proc = subprocess.run(["scontrol", "show", "job", "-o", job_id], env=cluster.env(), capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return dict(item.split("=", 1) for item in proc.stdout.split() if "=" in item)


def jobs_info(cluster: Cluster, job_ids: list[str]) -> dict[str, dict[str, str]]:
    """`scontrol show job` of several jobs with one call (every job the controller still keeps), by job id."""
    proc = subprocess.run(["scontrol", "show", "job", "-o"], env=cluster.env(), capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    jobs = {}
    for line in proc.stdout.splitlines():
        info = dict(item.split("=", 1) for item in line.split() if "=" in item)
        if info.get("JobId") in job_ids:
            jobs[info["JobId"]] = info
    missing = set(job_ids) - set(jobs)
    assert not missing, f"the controller does not know jobs {sorted(missing)}"
    return jobs


def wait_job(cluster: Cluster, job_id: str, timeout: float) -> dict[str, str]:
    """Poll until the job reaches a final state (a requeued job passes through PENDING again)."""
    deadline = time.monotonic() + timeout
    while True:
        info = job_info(cluster, job_id)
        if info["JobState"] in FINAL_STATES:
            return info
        if info.get("Reason") == "DependencyNeverSatisfied":
            raise AssertionError(f"job {job_id} waits on a dependency that failed")
        if time.monotonic() > deadline:
            subprocess.run(["scancel", job_id], env=cluster.env())
            raise AssertionError(f"job {job_id} still {info['JobState']} ({info.get('Reason')}) after {timeout} s")
        time.sleep(0.2)


@dataclass
class Watched:
    """A submitted job for `watch`: signalled with `scancel <scancel>` once `reached(self)` holds (if it has a
    trigger), and followed to its final state (`info`, with `ended` the monotonic time it was seen there)."""
    name: str
    job: str
    out: Path  # the job's --output file
    run: Path = field(default_factory=Path)  # its checkpoint.dir
    reached: Callable[["Watched"], bool] | None = None
    scancel: tuple[str, ...] = ("--signal=USR1", "--batch")
    state: str = "PENDING"  # last JobState seen
    signalled: bool = False
    submitted: float = field(default_factory=time.monotonic)
    ended: float | None = None
    info: dict[str, str] = field(default_factory=dict)

    def log(self) -> str:
        return self.out.read_text() if self.out.exists() else ""


def watch(cluster: Cluster, jobs: list[Watched], timeout: float) -> None:
    """Run the jobs together: signal each as it reaches its point, return once all are final.

    The triggers (a file read, or the last state seen) are checked every 50 ms, the states of all jobs every
    200 ms with one `scontrol` call; a job with a trigger that ends before its point was reached fails here."""
    deadline = time.monotonic() + timeout
    pending = list(jobs)
    next_poll = 0.0
    while pending:
        for w in pending:
            if w.reached is not None and not w.signalled and w.reached(w):
                subprocess.run(["scancel", *w.scancel, w.job], env=cluster.env(), check=True)
                w.signalled = True
        if time.monotonic() >= next_poll:
            infos = jobs_info(cluster, [w.job for w in pending])
            next_poll = time.monotonic() + 0.2
            for w in list(pending):
                info = infos[w.job]
                w.state = info["JobState"]
                if info["JobState"] in FINAL_STATES:
                    assert w.reached is None or w.signalled, f"{w.name}: the job ended before its point was reached"
                    w.info, w.ended = info, time.monotonic()
                    pending.remove(w)
        if pending and time.monotonic() > deadline:
            subprocess.run(["scancel", *[w.job for w in pending]], env=cluster.env())
            raise AssertionError(f"still running after {timeout} s: {[(w.name, w.state) for w in pending]}")
        time.sleep(0.05)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def write_config(path: Path, run_dir: Path, *, max_steps: int, seed: int, extra: str = "") -> Path:
    path.write_text(f"train:\n  max_steps: {max_steps}\n  seed: {seed}\n"
                    f"checkpoint:\n  dir: {run_dir}\n  resume: auto\n{extra}")
    return path


WORDS = ("the a model data token train loss step rank shard layer head query key value norm gradient batch "
         "sequence learning rate warm cosine decay checkpoint resume signal metric run tensor").split()


def make_shards(root: Path) -> Path:
    """Corpus -> BPE tokenizer -> shards through the real `pretrain-data` CLI."""
    rng = random.Random(1)
    root.mkdir(parents=True, exist_ok=True)
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": " ".join(rng.choices(WORDS, k=rng.randint(20, 120)))}) + "\n"
                              for _ in range(300)))
    for args in (["train-tokenizer", "--input", str(corpus), "--vocab-size", "384", "--out", str(root / "tok")],
                 ["prepare", "--input", str(corpus), "--tokenizer", str(root / "tok"), "--out", str(root / "shards"),
                  "--shard-size-mb", "0.1", "--workers", "0", "--no-progress"]):
        proc = subprocess.run([sys.executable, "-m", "data_pipeline", *args], cwd=REPO, env=child_env(),
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
    return root / "shards"


def train_overrides(shards: Path, run_dir: Path, steps: int, *extra: str, tracking: bool = True) -> list[str]:
    """`--set` arguments of the tiny debug model (DP=2 ZeRO-2 over the two nodes), `extra` last (they win)."""
    sets = ["model.n_layers=2", "model.dim=32", "model.n_heads=4", "model.n_kv_heads=2", "model.ffn_hidden_dim=64",
            f"data.path={shards}", "data.shuffle_buffer=16", "data.val_path=null", "train.seq_len=32",
            "train.micro_batch_size=2", "train.grad_accum=2", "train.log_every=10", f"train.max_steps={steps}",
            "train.eval_every=0", "optim.warmup_steps=2", "parallel.zero_stage=2", f"checkpoint.dir={run_dir}",
            "checkpoint.every=0", f"tracking.enabled={str(tracking).lower()}", *extra]
    return [arg for item in sets for arg in ("--set", item)]


def step_losses(run_dir: Path) -> dict[int, float]:
    """metrics.jsonl as {step: loss}; a step logged twice fails."""
    records = read_jsonl(run_dir / "metrics.jsonl")
    steps = [r["step"] for r in records]
    assert len(steps) == len(set(steps)), f"a step was logged twice: {steps}"
    return {r["step"]: r["loss"] for r in records}


# The real `pretrain train` runs of the signal sweep (tests/slurm/test_signal_sweep.py), whose "save and eval" job is
# also test_real_training.py's preempted job: the debug model for 12 steps, checkpoint every 2 steps, evaluate every
# 4 (on the training shards: the point is the timing, not the number), every step logged.
SWEEP_STEPS = 12
# Each sweep job's step sleeps this long first (pretrain/train/faults.py): 12 steps of the tiny model take ~3 s on
# 2 cores, less than a notice takes from "step 3 is logged" through scancel, slurmctld and srun to the ranks, and the
# "save and eval" job then finished before its notice came (exit 0, no requeue). The losses do not change.
SWEEP_STEP_SECONDS = "0.5"
SWEEP_EXTRA = ("checkpoint.every=2", "train.eval_every=4", "train.eval_steps=2", "train.log_every=1")


@dataclass(frozen=True)
class Point:
    name: str
    steps_logged: int | None  # signal once metrics.jsonl has this many steps (None: on the output's `done:` line)
    requeued: bool | None  # whether the job must go through a requeue (None: either way, by timing)
    scancel: tuple[str, ...] = ("--signal=USR1", "--batch")  # the notice, to the batch shell

    def reached(self, job: Watched) -> bool:
        if self.steps_logged is None:
            return f"done: step {SWEEP_STEPS}" in job.log()
        if self.steps_logged == 0:  # the batch shell's first line, printed once its traps are set (no process
            return "pretrain.sbatch: job" in job.log()  # can take a signal before it installs its handler)
        return len(read_jsonl(job.run / "metrics.jsonl")) >= self.steps_logged


SWEEP_POINTS = [
    Point("start-up", 0, requeued=None),  # the batch shell runs; srun is not up yet or the ranks are starting
    Point("early steps", 1, requeued=True),
    Point("save and eval", 3, requeued=True),  # step 4 trains, evaluates and saves next
    Point("last step", SWEEP_STEPS - 1, requeued=None),  # lands before or after the last step's stop check
    Point("after done", None, requeued=False),  # the final checkpoint is committed: nothing to requeue
    # SIGTERM straight to the step's processes (launchers and ranks), as `scancel --signal=TERM` sends it
    Point("TERM to the steps", 2, requeued=True, scancel=("--signal=TERM",)),
]
