"""A checkpoint loaded for evaluation on this launch's layout: process groups, engine, replica, tokenizer.

The checkpoint may have been written with any layout (or imported from Hugging Face); its weights are read
tensor by tensor and each rank keeps its slice, the way `model.init_from` starts a run, so a TP2 x PP2 checkpoint
is evaluated in place on 4 ranks, or on 1. The engine is the training engine (the same forward, loss head and
kernels the numbers in metrics.jsonl came from) at ZeRO-0 (ZeRO-1 in bf16, which DeepSpeed needs to build a bf16
engine at all): nothing is trained, so nothing is sharded. The vocabulary keeps the checkpoint's padding whenever
the new tensor-parallel degree divides it, so log-likelihoods do not depend on the layout they are computed on.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pretrain.checkpoint.weights import checkpoint_tokenizer, open_weights
from pretrain.config import Config, ConfigError
from pretrain.eval.replica import Replica
from pretrain.run.distributed import DistEnv, init_distributed
from pretrain.run.layout import Layout, check_layout, pad_vocab
from pretrain.run.resolved import ResolvedRun
from pretrain.train.engine import build_engine


@dataclass
class Session:
    step_dir: Path
    run: ResolvedRun  # the checkpoint's run on this launch's layout
    env: DistEnv
    replica: Replica
    tokenizer: Any
    checkpoint: str  # as given: lm-eval's --model_args name it


# The session `pretrain eval` opened before handing control to lm-eval's command line, which then builds the model
# from `--model pretrain --model_args checkpoint=...` (pretrain/eval/lm.py) and must get this one.
_LIVE: dict[str, Session] = {}


def live(checkpoint: str) -> Session | None:
    return _LIVE.get(checkpoint)


def eval_config(run: ResolvedRun, tp: int, pp: int, dtype: str, device: str) -> Config:
    """The typed config the training engine is built from: the checkpoint's model shape, this layout, no
    tracking."""
    m = run.model
    return Config.model_validate({
        "model": {"dim": m.dim, "n_layers": m.n_layers, "n_heads": m.n_heads, "n_kv_heads": m.kv_heads,
                  "ffn_hidden_dim": m.hidden_dim, "vocab_size": m.vocab_size, "rope_theta": m.rope_theta,
                  "norm_eps": m.norm_eps, "tie_embeddings": m.tie_embeddings},
        "train": {"dtype": dtype, "device": device, "micro_batch_size": 1, "grad_accum": 1, "seq_len": run.seq_len},
        # nothing is trained, so nothing needs sharding; bf16 needs a ZeRO optimizer for DeepSpeed to build at all
        "parallel": {"tp": tp, "pp": pp, "zero_stage": 1 if dtype == "bf16" else 0},
        "tracking": {"enabled": False},
    })


def eval_run(run: ResolvedRun, cfg: Config, world: int) -> ResolvedRun:
    """The checkpoint's resolved run, re-laid out for `world` ranks (layout rules checked in one line each)."""
    check_layout(cfg, world)
    p = cfg.parallel
    padded = run.model.vocab_size if run.model.vocab_size % p.tp == 0 else pad_vocab(run.vocab_size, p.tp)
    layout = Layout(world=world, tp=p.tp, pp=p.pp, dp=world // (p.tp * p.pp), micro_batch_size=1, grad_accum=1,
                    padded_vocab_size=padded)
    return dataclasses.replace(run, layout=layout, model=run.model.replace(vocab_size=padded),
                               dtype=cfg.train.dtype, zero_stage=cfg.parallel.zero_stage)


def open_session(checkpoint: str, *, tp: int = 1, pp: int = 1, tokenizer: str | None = None,
                 dtype: str | None = None, device: str = "auto") -> Session:
    """Every rank of the launch: the checkpoint's weights sliced onto this layout, and the replica that answers
    lm-eval (`live(checkpoint)` gives it to pretrain/eval/lm.py for `--model_args checkpoint=<the same path>`)."""
    step_dir, source = open_weights(checkpoint)
    _, tok = checkpoint_tokenizer(step_dir, source.run, tokenizer)
    if dtype not in (None, "fp32", "bf16"):
        raise ConfigError(f"--dtype {dtype}: fp32 or bf16")
    cfg = eval_config(source.run, tp, pp, dtype or source.run.dtype, device)
    run = eval_run(source.run, cfg, int(os.environ.get("WORLD_SIZE", "1")))
    env = init_distributed(cfg, layout=run.layout)
    engine = build_engine(cfg, env, run, init=source)  # each rank copies its slice of every whole tensor
    session = Session(step_dir, run, env, Replica(engine, env), tok, checkpoint)
    _LIVE[checkpoint] = session
    return session

