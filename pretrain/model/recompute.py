"""Selective activation recompute: keep what is expensive to make, recompute what is cheap.

`activation_checkpointing: selective` runs each block under torch.utils.checkpoint with an op-level policy
(torchtitan's selective activation checkpointing): the outputs of matmuls, of attention and of the TP all-reduce
are kept for backward; everything else (RMSNorm, RoPE, the SwiGLU product, residual adds, casts) is recomputed
from them when backward needs it. Backward so re-runs no matmul, no attention kernel and no all-reduce (under
sequence parallelism and ZeRO-3 it re-runs the all-gathers and reduce-scatters, see below), and the memory a block
holds is its input, the projections' outputs and attention's outputs
(pretrain/plan/describe.py counts them; tests/model/test_recompute.py counts the matmuls).

Fused Triton kernels (RMSNorm, RoPE, SwiGLU) are not dispatcher ops: they are always recomputed, as intended.
"""
from __future__ import annotations

import torch
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

_aten = torch.ops.aten
SAVED_OPS = {
    _aten.mm.default, _aten.addmm.default, _aten.bmm.default,
    # FP8 (torchao): its matmuls, and the amax its scales come from (tensorwise: max of the whole tensor; rowwise:
    # amax per row). Each is a full read of an activation for a few numbers: kept, never recomputed.
    _aten._scaled_mm.default, _aten.max.default, _aten.amax.default,
    _aten._scaled_dot_product_flash_attention.default,  # CUDA flash
    _aten._scaled_dot_product_efficient_attention.default,
    _aten._scaled_dot_product_cudnn_attention.default,
    _aten._scaled_dot_product_flash_attention_for_cpu.default,
    # megatron-core's TP all-reduce (in place on the matmul output it reduces): kept, not sent twice.
    torch.ops.c10d.allreduce_.default,
}
# Document masking on CUDA: varlen flash attention (pretrain/kernels/varlen_attention.py), a custom op that exists
# once torch.nn.attention.varlen is imported. Matched by name: importing that module here would import torch._dynamo
# (0.6 s) into every rank, where only a CUDA run with document masking calls the op.
SAVED_OP_NAMES = {"torch_attn::_varlen_attn"}
# Not kept: collectives that write into a buffer their caller allocated (all-gather into, reduce-scatter into:
# megatron-core's sequence parallelism, DeepSpeed ZeRO-3's parameter gathers). Their callers read the buffer, not
# the op's return value, so a cached return value would leave the recomputed buffer empty; they run again.
FUNCTIONAL_COLLECTIVES = "_c10d_functional"  # out-of-place: their return value is the result


def _policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    if op in SAVED_OPS or getattr(op, "namespace", "") == FUNCTIONAL_COLLECTIVES or _name(op) in SAVED_OP_NAMES:
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def _name(op) -> str:
    return op.name() if isinstance(op, torch._ops.OpOverload) else ""


def selective_context():
    """The context pair for torch.utils.checkpoint(..., context_fn=selective_context).

    allow_cache_entry_mutation: megatron-core's row-parallel linear all-reduces its matmul's output in place, so
    the kept matmul output is later mutated. Both it and the all-reduce's result are kept, and recompute takes
    both from the cache (no second all-reduce), so the reduced values are the ones backward sees; a matmul's
    backward reads its inputs, never its output."""
    return create_selective_checkpoint_contexts(_policy, allow_cache_entry_mutation=True)
