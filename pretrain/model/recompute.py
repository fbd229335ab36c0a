"""Selective activation recompute: keep what is expensive to make, recompute what is cheap.

`activation_checkpointing: selective` runs each block under torch.utils.checkpoint with an op-level policy
(torchtitan's selective activation checkpointing): the outputs of matmuls, of attention and of collectives are
kept for backward; everything else (RMSNorm, RoPE, the SwiGLU product, residual adds, casts) is recomputed from
them when backward needs it. Backward so re-runs no matmul, no attention kernel and no collective, and the
memory a block holds is its input, the projections' outputs and attention's outputs
(pretrain/parallel/describe.py counts them; tests/model/test_recompute.py counts the matmuls).

Fused Triton kernels (RMSNorm, RoPE, SwiGLU) are not dispatcher ops: they are always recomputed, as intended.
"""
from __future__ import annotations

import torch
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

_aten = torch.ops.aten
SAVED_OPS = {
    _aten.mm.default, _aten.addmm.default, _aten.bmm.default,
    _aten._scaled_dot_product_flash_attention.default,  # CUDA flash
    _aten._scaled_dot_product_efficient_attention.default,
    _aten._scaled_dot_product_cudnn_attention.default,
    _aten._scaled_dot_product_flash_attention_for_cpu.default,
}
# torch.distributed's collectives as dispatcher ops (megatron-core's TP all-reduce, SP all-gather/reduce-scatter).
COLLECTIVE_NAMESPACES = ("c10d", "_c10d_functional")


def _policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    if op in SAVED_OPS or getattr(op, "namespace", "") in COLLECTIVE_NAMESPACES:
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def selective_context():
    """The context pair for torch.utils.checkpoint(..., context_fn=selective_context).

    allow_cache_entry_mutation: megatron-core's row-parallel linear all-reduces its matmul's output in place, so
    the kept matmul output is later mutated. Both it and the all-reduce's result are kept, and recompute takes
    both from the cache (no second all-reduce), so the reduced values are the ones backward sees; a matmul's
    backward reads its inputs, never its output."""
    return create_selective_checkpoint_contexts(_policy, allow_cache_entry_mutation=True)
