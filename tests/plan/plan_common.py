"""Shared by the planner tests and their torchrun worker: the tiny shapes measured, and their configs."""
from __future__ import annotations

from typing import Iterator

import torch

from pretrain.config import load_config
from pretrain.model.args import ModelArgs

VOCAB = 256   # a multiple of 128 x 2: the same padded vocabulary at tp = 1 and 2
SEQ = 32
BATCH = 2
PP_ACCUM = 4  # micro-batches per step in the pipeline case: more than pp, so 1F1B's warm-up is visible
# GQA (4 query heads, 2 kv heads), FFN width 3 x dim, 4 blocks (2 per pipeline stage).
SHAPE = ["model.flavor=debug", "model.dim=64", "model.n_layers=4", "model.n_heads=4", "model.n_kv_heads=2",
         "model.ffn_hidden_dim=192"]
# ZeRO: a model large enough (1.3 M parameters) that DeepSpeed's fixed-size bookkeeping is not what is measured.
ZERO_SHAPE = ["model.flavor=debug", "model.dim=256", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2",
              "model.ffn_hidden_dim=512"]


def case_overrides(*, tp: int = 1, pp: int = 1, zero: int = 0, dtype: str = "fp32", mode: str = "none",
                   world: int = 2, cp: int = 1) -> list[str]:
    dp = world // (tp * pp * cp)
    shape = ZERO_SHAPE if (tp, pp) == (1, 1) else SHAPE
    return shape + [f"model.vocab_size={VOCAB}", f"train.seq_len={SEQ}", f"train.micro_batch_size={BATCH}",
                    f"train.grad_accum={PP_ACCUM if pp > 1 else 1}", f"parallel.tp={tp}", f"parallel.pp={pp}",
                    f"parallel.cp={cp}", f"parallel.zero_stage={zero}", f"train.dtype={dtype}", f"model.activation_checkpointing={mode}",
                    "train.device=cpu", "model.fused_kernels=false", "optim.warmup_steps=0"] + (
                    [] if dp else ["invalid"])


def block_args() -> ModelArgs:
    return load_config(None, case_overrides(tp=2)).model.args(VOCAB)


# Context parallelism's block cases: (n_kv_heads, qk_norm). With cp = 2, 2 kv heads split 2 ways; 1 (multi-query)
# does not, and is repeated first (2 copies: pretrain.run.layout.kv_replicas).
CP_BLOCKS = [(2, False), (2, True), (1, False), (1, True)]


def cp_block_args(kv_heads: int, qk_norm: bool) -> ModelArgs:
    return block_args().replace(n_kv_heads=kv_heads, qk_norm=qk_norm)


def micro_batches(n: int) -> Iterator[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    for _ in range(n):
        yield {"tokens": torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=g)}
