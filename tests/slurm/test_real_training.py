"""The real `pretrain train` (debug model, DP=2 ZeRO-2, gloo) under slurm/pretrain.sbatch on the 2-node cluster.

The issue's acceptance, end to end: one rank per node trains to completion; a USR1 mid-run (what SLURM sends
ahead of a time limit or a preemption) checkpoints, exits 42, `scontrol requeue` brings the same job back, it
resumes from `latest`; the concatenated per-step losses equal a plain single-node 2-rank torchrun run bit for
bit, and MLflow holds one run with every step exactly once.
"""
from __future__ import annotations

import json
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest

from slurm_helpers import (REPO, SBATCH, Cluster, child_env, job_info, read_jsonl, sbatch, torchrun, wait_job)

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

STEPS = 150
WORDS = ("the a model data token train loss step rank shard layer head query key value norm gradient batch "
         "sequence learning rate warm cosine decay checkpoint resume signal metric run tensor").split()


def _shards(root: Path) -> Path:
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


def _overrides(shards: Path, run_dir: Path, tracking: bool = True) -> list[str]:
    sets = ["model.n_layers=2", "model.dim=32", "model.n_heads=4", "model.n_kv_heads=2", "model.ffn_hidden_dim=64",
            f"data.path={shards}", "data.shuffle_buffer=16", "data.val_path=null", "train.seq_len=32",
            "train.micro_batch_size=2", "train.grad_accum=2", "train.log_every=10", f"train.max_steps={STEPS}",
            "train.eval_every=0", "optim.warmup_steps=2", "parallel.zero_stage=2", f"checkpoint.dir={run_dir}",
            "checkpoint.every=0", f"tracking.enabled={str(tracking).lower()}"]
    return [arg for item in sets for arg in ("--set", item)]


def _losses(run_dir: Path) -> dict[int, float]:
    records = read_jsonl(run_dir / "metrics.jsonl")
    steps = [r["step"] for r in records]
    assert len(steps) == len(set(steps)), f"a step was logged twice: {steps}"
    return {r["step"]: r["loss"] for r in records}


def test_real_training_preempted_on_two_nodes_resumes_the_exact_local_curve(slurm_cluster: Cluster,
                                                                            tmp_path: Path) -> None:
    shards = _shards(tmp_path / "data")
    config = str(REPO / "configs" / "debug.yaml")
    local = _overrides(shards, tmp_path / "local", tracking=False)  # tracking does not change the losses
    torchrun(2, ["-m", "pretrain", "train", "--config", config, *local], timeout=400)
    reference = _losses(tmp_path / "local")
    assert sorted(reference) == list(range(1, STEPS + 1))

    run = tmp_path / "slurm"
    job = sbatch(slurm_cluster, ["--nodes", "2", "--gpus-per-node=0", "--cpus-per-task=1", "--time=15",
                                 f"--output={tmp_path}/%x-%j.out", str(SBATCH), config, *_overrides(shards, run)],
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
    assert _losses(run) == reference  # both runs of the job together: the uninterrupted curve, bit for bit

    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{run / 'mlruns' / 'mlflow.db'}")
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    assert len(runs) == 1, "the requeued job continues the same MLflow run"
    history = client.get_metric_history(runs[0].info.run_id, "loss")
    assert sorted(m.step for m in history) == list(range(1, STEPS + 1))
