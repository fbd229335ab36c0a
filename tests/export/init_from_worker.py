"""Runs inside torchrun (2 ranks, gloo): builds the training engine with `model.init_from` = an imported
checkpoint under several layouts and saves the full-vocabulary logits of fixed tokens, before any step.

Usage: python -m torch.distributed.run --nproc-per-node 2 tests/export/init_from_worker.py TOKENS OUT CKPT:TIED...
(TIED is "tied" or "untied"; one launch serves several checkpoints: importing DeepSpeed costs more than the model.)
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

from pretrain.libraries import lighten_imports

lighten_imports()  # as `pretrain train` does, before DeepSpeed and megatron-core are imported
from pretrain.config import load_config  # noqa: E402
from pretrain.run.distributed import init_distributed  # noqa: E402
from pretrain.train.engine import build_engine  # noqa: E402
from pretrain.run.resolved import resolve_run  # noqa: E402
from pretrain.checkpoint.weights import init_source  # noqa: E402

LAYOUTS = {"tp1_dp2_zero3": ["parallel.tp=1", "parallel.zero_stage=3"],
           "tp2_zero1": ["parallel.tp=2", "parallel.zero_stage=1"]}


def shape(ckpt: str, tied: bool) -> list[str]:
    """The oracle's shape (tests/export/hf_oracle.py), spelled as config overrides."""
    return ["model.flavor=debug", "model.dim=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2",
            "model.ffn_hidden_dim=96", "model.norm_eps=1e-6", "model.rope_theta=50000.0", "model.vocab_size=300",
            f"model.tie_embeddings={str(tied).lower()}", f"model.init_from={ckpt}", "train.device=cpu",
            "train.micro_batch_size=1", "train.seq_len=40"]


def main(tokens_file: str, out: str, *checkpoints: str) -> None:
    from megatron.core import parallel_state

    tokens = torch.load(tokens_file)
    for item in checkpoints:
        ckpt, tied = item.rsplit(":", 1)
        for name, overrides in LAYOUTS.items():
            cfg = load_config(None, shape(ckpt, tied == "tied") + overrides)
            run = resolve_run(cfg, 2, require_data=False)  # batches from the test, not shards
            env = init_distributed(cfg, layout=run.layout)
            try:
                engine = build_engine(cfg, env, run, init_source(cfg, run))
                engine.ds.eval()
                with torch.no_grad():
                    local = engine.ds(tokens)  # (B, T, V / tp): this rank's vocabulary shard
                # megatron-core's gather helper calls torch.cuda; on gloo, all_gather over the TP group instead.
                group = parallel_state.get_tensor_model_parallel_group()
                parts = [torch.empty_like(local) for _ in range(env.layout.tp)]
                torch.distributed.all_gather(parts, local.contiguous(), group=group)
                logits = torch.cat(parts, dim=-1)  # (B, T, padded V)
                if env.rank == 0:
                    torch.save(logits, Path(out) / f"{tied}_{name}.pt")
            finally:
                parallel_state.destroy_model_parallel()


if __name__ == "__main__":
    main(*sys.argv[1:])
