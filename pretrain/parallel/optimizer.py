"""AdamW with decoupled weight decay on matrices only, and a guard for the one path DeepSpeed leaves unguarded.

DeepSpeed's ZeRO-1/2/3 and bf16 optimizers compute the global grad norm, clip, and skip the step (counting it in
`skipped_steps`) when the norm is not finite. With ZeRO-0 in fp32 DeepSpeed hands our optimizer the module's own
parameters and only clips (without recording the norm, and without a non-finite check). For that path
`GuardedAdamW(own_clipping=True)` does the norm, the clip and the skip itself, and reports them through the same
attributes DeepSpeed reads from its own optimizers (`_global_grad_norm`, `overflow`).
"""
from __future__ import annotations

import math
from typing import Callable, Iterable

import torch
import torch.distributed as dist


def decays(ndim: int) -> bool:
    """Matrices (projections, embeddings) decay; vectors (RMSNorm weights, biases) do not. The checkpoint reader
    uses the same rule to find a parameter's index in a saved torch optimizer state."""
    return ndim >= 2


def param_groups(named_params: Iterable[tuple[str, torch.nn.Parameter]], weight_decay: float) -> list[dict]:
    """Two groups, decayed parameters first (a saved optimizer state indexes parameters in this order)."""
    decay, no_decay = [], []
    for _, p in named_params:
        if p.requires_grad:
            (decay if decays(p.ndim) else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def global_grad_norm(params: list[torch.Tensor], replicas: int, count_replicated: bool) -> float:
    """L2 norm of the whole model's gradient from per-rank pieces, agreed on every rank.

    Sums squares over the world: tensor-parallel shards add up; parameters replicated over TP (norm weights) are
    counted on TP rank 0 only (`count_replicated`); every weight replica (DP x CP ranks) holds the same averaged
    gradient, so the world sum is `replicas` times the model's.
    """
    device = params[0].device if params else torch.device("cpu")  # NCCL reduces device tensors only
    local = torch.zeros((), dtype=torch.float64, device=device)
    for p in params:
        if p.grad is not None and (count_replicated or getattr(p, "tensor_model_parallel", False)):
            local += p.grad.detach().double().pow(2).sum()
    if dist.is_initialized():
        dist.all_reduce(local)
    return math.sqrt(float(local) / replicas) if math.isfinite(float(local)) else float("nan")


class GuardedAdamW(torch.optim.AdamW):
    def __init__(self, params, *, grad_clip: float, own_clipping: bool,
                 norm_fn: Callable[[list[torch.Tensor]], float] | None = None, **kwargs):
        super().__init__(params, **kwargs)
        self.grad_clip = grad_clip
        self.own_clipping = own_clipping
        self.norm_fn = norm_fn
        self.overflow = False
        self._global_grad_norm: float | None = None

    @torch.no_grad()
    def step(self, closure=None):
        if not self.own_clipping:
            return super().step(closure)
        params = [p for g in self.param_groups for p in g["params"]]
        norm = self.norm_fn(params)
        self._global_grad_norm = norm
        self.overflow = not math.isfinite(norm)
        if self.overflow:  # the same verdict on every rank: the norm was all-reduced
            return None
        coef = self.grad_clip / (norm + 1e-6)  # torch's clip_grad_norm_ formula, so ZeRO-0 matches it exactly
        if self.grad_clip > 0 and coef < 1.0:
            for p in params:
                if p.grad is not None:
                    p.grad.mul_(coef)
        return super().step(closure)
