"""Causal attention within each document of a packed micro-batch, by flash attention's variable-length kernel.

The B rows of T tokens are flattened to B*T tokens and `cu_seqlens` marks where each document starts, so the
kernel never looks across a document (or row) boundary and never builds a (T, T) mask: memory stays linear in T
and the flash kernel's speed is kept. torch exposes it as `torch.nn.attention.varlen.varlen_attn` (CUDA only).
Its keyword for "causal" changed between releases (`is_causal=True` in 2.10, `window_size=(-1, 0)` from 2.11),
and grouped-query heads are taken as they are through `enable_gqa` from 2.12; both are read off the installed
signature. Without `enable_gqa` (torch 2.10 and 2.11) each kv head is repeated for its H/K query heads before the
call: correct, at the cost of H/K - 1 more copies of K and V kept for backward (at the 8b shape, 32 query heads
over 8 kv heads of size 128 in bf16: 12 KiB more per token per block). That is chosen over one kernel call per
group of query heads, which would keep the memory but launch H/K kernels; torch >= 2.12 needs neither.
"""
from __future__ import annotations

import functools
import inspect
from typing import Callable

import torch

VarlenFn = Callable[..., torch.Tensor]


@functools.lru_cache(maxsize=1)
def _installed() -> VarlenFn | None:
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


def available(q: torch.Tensor) -> bool:
    """Whether the varlen kernel can run these queries: CUDA, half precision, a head size flash supports."""
    return (q.is_cuda and q.dtype in (torch.bfloat16, torch.float16) and q.shape[-1] % 8 == 0
            and q.shape[-1] <= 256 and _installed() is not None)


def _keywords(fn: VarlenFn, grouped: bool) -> dict:
    params = inspect.signature(fn).parameters
    kw: dict = {"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True}
    if grouped and "enable_gqa" in params:
        kw["enable_gqa"] = True
    return kw


def causal_varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                            max_len: int, fn: VarlenFn | None = None) -> torch.Tensor:
    """q (B, T, H, hd), k/v (B, T, K, hd) -> (B, T, H, hd). `fn` replaces torch's kernel (tests pass a CPU one)."""
    fn = fn or _installed()
    B, T, H, hd = q.shape
    K = k.shape[2]
    kw = _keywords(fn, grouped=H != K)
    if H != K and "enable_gqa" not in kw:  # an older torch: give every query head its own copy of its kv head
        k, v = k.repeat_interleave(H // K, dim=2), v.repeat_interleave(H // K, dim=2)
        K = H
    y = fn(q.reshape(B * T, H, hd), k.reshape(B * T, K, hd), v.reshape(B * T, K, hd),
           cu_seqlens, cu_seqlens, max_len, max_len, **kw)
    return y.view(B, T, H, hd)
