"""Gather a model spread over TP shards, PP stages and ZeRO-3 partitions into one reference-named state dict.

Each process of the first weight replica (data-parallel and context-parallel rank 0) contributes its local
parameters (whole under ZeRO 0-2; gathered first under ZeRO-3), named by the reference model and tagged with
megatron-core's `partition_dim` when TP-split; rank 0 concatenates TP shards in TP-rank order and merges stages.
Everything travels through `gather_object` on CPU: simple and layout-agnostic, at the cost of rank 0 holding the
whole model in host memory. Only the tests use it now, as the live-engine oracle for
`Engine.reference_state_dict`: export, generate and re-slicing read a saved step offline, one tensor at a time
(pretrain/checkpoint/reader.py).
"""
from __future__ import annotations

import contextlib
from typing import Callable

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

Piece = tuple[torch.Tensor, int | None, int]  # (tensor, partition_dim or None, tp_rank)


def consolidate(module: torch.nn.Module, rename: Callable[[str], str], zero3: bool,
                first_replica: bool) -> dict[str, torch.Tensor] | None:
    params = list(module.named_parameters())
    gather = contextlib.nullcontext()
    if zero3:
        import deepspeed

        gather = deepspeed.zero.GatheredParameters([p for _, p in params], modifier_rank=None)
    local: dict[str, Piece] = {}
    with gather:
        if first_replica:
            tp_rank = ps.get_tensor_model_parallel_rank()
            for name, p in params:
                split = getattr(p, "partition_dim", None) if getattr(p, "tensor_model_parallel", False) else None
                local[rename(name)] = (p.detach().float().cpu().clone(), split, tp_rank)
    world = dist.get_world_size() if dist.is_initialized() else 1
    everything: list[dict[str, Piece] | None] = [None] * world
    if world > 1:
        dist.gather_object(local, everything if dist.get_rank() == 0 else None, dst=0)
    else:
        everything = [local]
    if dist.is_initialized() and dist.get_rank() != 0:
        return None
    pieces: dict[str, list[Piece]] = {}
    for part in everything:
        for name, piece in (part or {}).items():
            pieces.setdefault(name, []).append(piece)
    out: dict[str, torch.Tensor] = {}
    for name in sorted(pieces):
        got = sorted(pieces[name], key=lambda x: x[2])
        dim = got[0][1]
        out[name] = got[0][0] if dim is None else torch.cat([t for t, _, _ in got], dim=dim)
    return out
