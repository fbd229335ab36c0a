"""Context parallelism, DeepSpeed-Ulysses: each of the cp ranks holds T/cp tokens of every sequence.

Everything in a block but attention acts on each token alone (norms, projections, SwiGLU, residuals), so it runs
unchanged on a rank's slice. Attention is the one place tokens meet: DeepSpeed's `DistributedAttention` swaps
the split around it with an all-to-all - (B, T/cp, H, hd) in, (B, T, H/cp, hd) into the model's own
`CoreAttention` (rotary positions 0..T-1 of the whole sequence, causal or per-document masks, flash attention on
CUDA: unchanged, since it sees whole sequences), and an all-to-all back. The volume per block is 4 exchanges
(q, k, v, output) of (cp - 1)/cp of a rank's activations, against a ring's cp - 1 passes of keys and values.

Heads: each rank takes H/(tp x cp) query heads (`pretrain.run.layout.check_context_parallel`); grouped-query
key/value heads that do not split cp ways are repeated first (`pretrain.run.layout.kv_replicas` copies), each copy
next to the query heads that read it, so the all-to-all hands every rank whole groups. The gradient of the copies
sums back through the repeat.

What the rest of the run does for it: the engine gives each rank its slice of the tokens and targets, and the
document boundaries of the whole sequences (`Engine.split`); the mpu tells DeepSpeed the CP group and the
DP x CP gradient group (pretrain/parallel/mpu.py). Under selective recompute the all-to-alls write into buffers
of DeepSpeed's and run again in backward, like sequence parallelism's all-gathers (pretrain/model/recompute.py).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from deepspeed.sequence.layer import DistributedAttention
from torch import nn

from pretrain.model.transformer import Attention, CoreAttention

BATCH_DIM = 0  # our activations are batch-first: (B, T, heads, hd)
HEADS, SEQUENCE = 2, 1  # the all-to-all scatters heads and gathers the sequence (and the reverse after attention)


class UlyssesAttention(nn.Module):
    """`CoreAttention` over the whole sequence for H/cp heads, called with this rank's T/cp tokens of all heads."""

    def __init__(self, core: CoreAttention, group: dist.ProcessGroup, n_kv_heads: int, kv_copies: int):
        super().__init__()
        self.kv_copies = kv_copies
        self.exchange = DistributedAttention(core, group, scatter_idx=HEADS, gather_idx=SEQUENCE,
                                             num_kv_heads=n_kv_heads * self.kv_copies)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, docs=None, start_pos: int = 0,
                cache=None) -> torch.Tensor:
        if cache is not None or start_pos != 0:
            raise ValueError("context parallelism splits whole training sequences; decode with parallel.cp=1")
        if self.kv_copies > 1:  # kv head j -> copies j*r .. j*r+r-1: query head h still reads a copy of h // (H/K)
            k = k.repeat_interleave(self.kv_copies, dim=2)
            v = v.repeat_interleave(self.kv_copies, dim=2)
        return self.exchange(q, k, v, BATCH_DIM, None, docs)


def apply_context_parallel(module: nn.Module, group: dist.ProcessGroup, kv_copies: int) -> None:
    """Route every attention layer's core through the all-to-all over `group`, each of this rank's key/value heads
    repeated `kv_copies` times first (the parameters are untouched: the names, the init and checkpoints do not
    know cp)."""
    for m in module.modules():
        if isinstance(m, Attention):
            m.core = UlyssesAttention(m.core, group, m.n_kv_heads, kv_copies)


def sequence_slice(t: torch.Tensor, cp: int, cp_rank: int) -> torch.Tensor:
    """This rank's contiguous T/cp columns of a (B, T) batch."""
    if t.shape[1] % cp:
        raise ValueError(f"{t.shape[1]} tokens per sequence do not split over parallel.cp={cp} ranks")
    width = t.shape[1] // cp
    return t[:, cp_rank * width:(cp_rank + 1) * width]


def partition_zero3_over_dp_cp(module: nn.Module, ds_config: dict, mpu, dtype: torch.dtype) -> None:
    """ZeRO-3 under context parallelism: partition the parameters over DP x CP before `deepspeed.initialize`.

    A shim for DeepSpeed 0.19: its ZeRO-3 converts a module's parameters with `mpu.get_data_parallel_group()`
    (DP only; `parameter_offload._convert_to_zero_parameters`), then reduce-scatters their gradients over that
    group, so the CP ranks' gradients (each from its own tokens) were never summed - found by the cp2 ZeRO-3
    parity row (gradients 30% off). Converted here with the sequence-data-parallel group (`zero.Init(module=)`),
    the engine keeps the group a parameter already has. The engine casts a converted module no more, so it is cast
    to the run's dtype first (bf16 compute, as every other layout)."""
    import deepspeed

    module.to(dtype)
    deepspeed.zero.Init(module=module, data_parallel_group=mpu.get_sequence_data_parallel_group(),
                        config_dict_or_path=ds_config, mpu=mpu, dtype=dtype)


def backward_loss_divisor(cp: int, zero_stage: int) -> int:
    """What each CP rank divides its loss (the mean over its T/cp tokens) by before backward, so the gradient is
    that of the CP group's token mean. DeepSpeed 0.19's Ulysses convention: gradients summed over DP x CP and
    divided by DP only (the plain engine's reduction, ZeRO-1/2's) - so cp. Its ZeRO-3 reduce-scatter
    (`reduce_scatter_coalesced`, the path `zero_optimization.reduce_scatter: true` takes) divides by DP x CP -
    so 1. The parity rows cp2 (ZeRO-0), cp2 ZeRO-2 and cp2 x dp2 ZeRO-3 hold both to the reference."""
    return 1 if zero_stage == 3 else cp
