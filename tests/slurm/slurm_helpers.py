"""Helpers for the SLURM tests: the cluster handle and submit/wait."""
from __future__ import annotations

import json
import random
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from spawn import child_env, torchrun  # noqa: F401  (re-exported to the slurm tests)

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "slurm_cluster.sh"
SBATCH = REPO / "slurm" / "pretrain.sbatch"
FAKE_TRAIN = Path(__file__).with_name("fake_train.py")
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
        time.sleep(0.5)


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
