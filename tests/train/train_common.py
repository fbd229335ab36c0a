"""Shared plumbing for the training-loop tests: tiny real shards (made once per session) and run helpers."""
from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

from spawn import REPO, child_env

WORDS = ("the a model data token train loss step rank shard layer head query key value norm gradient batch "
         "sequence learning rate warm cosine decay checkpoint resume signal metric run tensor pipeline zero "
         "optimizer adam weight bias attention rotary embedding vocabulary sample corpus text word").split()
_CACHE: dict[str, Path] = {}


class Solo:
    """A one-rank Collective (pretrain.checkpoint's protocol), for checks in one process."""
    rank, world_size = 0, 1

    def barrier(self) -> None:
        pass

    def all_reduce_max(self, value: float) -> float:
        return value


def tiny_shards(root: Path) -> Path:
    """A synthetic corpus -> BPE tokenizer -> webdataset shards, through the real `pretrain-data` CLI.

    Cached per session (module fixtures share it). Returns the directory holding `shards/` and `tok/`.
    """
    if "data" in _CACHE:
        return _CACHE["data"]
    rng = random.Random(0)
    texts = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 120))) + "." for _ in range(300)]
    shards_of(texts, root, shard_size_mb=0.1)
    _CACHE["data"] = root
    return root


def shards_of(texts: list[str], root: Path, *, shard_size_mb: float) -> Path:
    """`texts` as root/corpus.jsonl -> a 384-token BPE tokenizer in root/tok -> shards in root/shards (returned),
    in corpus order, through the real `pretrain-data` CLI."""
    root.mkdir(parents=True, exist_ok=True)
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    py = [sys.executable, "-m", "data_pipeline"]
    for args in (["train-tokenizer", "--input", str(corpus), "--vocab-size", "384", "--out", str(root / "tok")],
                 ["prepare", "--input", str(corpus), "--tokenizer", str(root / "tok"), "--out", str(root / "shards"),
                  "--shard-size-mb", str(shard_size_mb), "--workers", "0", "--no-progress"]):
        p = subprocess.run(py + args, cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=120)
        assert p.returncode == 0, p.stderr[-3000:]
    return root / "shards"


def train_args(shards: Path, run_dir: Path, *overrides: str) -> list[str]:
    """`-m pretrain train` on the debug model, tiny and fast; overrides appended last (they win)."""
    base = ["model.n_layers=2", "model.dim=32", "model.n_heads=4", "model.n_kv_heads=2", "model.ffn_hidden_dim=64",
            f"data.path={shards}", "data.shuffle_buffer=16", "train.seq_len=32", "train.micro_batch_size=2",
            "train.grad_accum=2", "train.log_every=1", "optim.warmup_steps=2", "parallel.zero_stage=0",
            f"checkpoint.dir={run_dir}", "checkpoint.every=0", "tracking.enabled=false", "data.val_path=null",
            "train.eval_every=0", "train.device=cpu", "train.backend=gloo"]
    out = ["-m", "pretrain", "train", "--config", str(REPO / "configs" / "debug.yaml")]
    for item in [*base, *overrides]:
        out += ["--set", item]
    return out


def run_python(args: list[str], **env: str) -> subprocess.CompletedProcess:
    """`python ARGS` from the repo root (e.g. `*train_args(...)`), output captured, 300 s at most."""
    return subprocess.run([sys.executable, *args], cwd=REPO, env=child_env(**env), capture_output=True, text=True,
                          timeout=300)


def launch(nproc: int, args: list[str], **env: str) -> subprocess.CompletedProcess:
    """`args` (e.g. `train_args(...)`) on `nproc` ranks under the local launcher, `python -m launch`."""
    return run_python(["-m", "launch", "--nproc-per-node", str(nproc), "--", *args], **env)


def losses(run_dir: Path) -> dict[int, float | str]:
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = [r["step"] for r in recs]
    assert len(steps) == len(set(steps)), f"duplicate steps in metrics.jsonl: {steps}"
    return {r["step"]: r["loss"] for r in recs}
