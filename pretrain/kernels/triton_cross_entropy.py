"""Fused softmax cross-entropy over a large vocabulary in Triton.

The eager path upcasts the whole (tokens x vocab) logits to fp32 and keeps the softmax for backward: at
128k vocab that is the largest activation of the model. Here forward streams each row once in vocab blocks
with an online log-sum-exp and saves one float per row; backward recomputes softmax block by block.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

_BLOCK_V = 2048


@triton.jit
def _ce_fwd(LOGITS, TARGETS, LOSS, LSE, stride_l, V, ignore_index, BLOCK_V: tl.constexpr):
    row = tl.program_id(0)
    base = LOGITS + row * stride_l
    target = tl.load(TARGETS + row)
    m = -float("inf")
    s = 0.0
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        x = tl.load(base + cols, mask=cols < V, other=-float("inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
        m = m_new
    lse = m + tl.log(s)
    tl.store(LSE + row, lse)
    valid = target != ignore_index
    safe_target = tl.where(valid, target, 0)
    x_t = tl.load(base + safe_target).to(tl.float32)
    tl.store(LOSS + row, tl.where(valid, lse - x_t, 0.0))


@triton.jit
def _ce_bwd(LOGITS, TARGETS, LSE, DLOGITS, SCALE, stride_l, stride_d, V, ignore_index, BLOCK_V: tl.constexpr):
    row = tl.program_id(0)
    target = tl.load(TARGETS + row)
    lse = tl.load(LSE + row)
    g = tl.where(target != ignore_index, tl.load(SCALE), 0.0)
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        mask = cols < V
        x = tl.load(LOGITS + row * stride_l + cols, mask=mask, other=0.0).to(tl.float32)
        # d(lse - x_t)/dx = softmax(x) - onehot(t)
        grad = (tl.exp(x - lse) - tl.where(cols == target, 1.0, 0.0)) * g
        tl.store(DLOGITS + row * stride_d + cols, grad.to(DLOGITS.dtype.element_ty), mask=mask)


class _CrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, ignore_index: int) -> torch.Tensor:
        logits = logits.contiguous()
        targets = targets.contiguous()
        N, V = logits.shape
        loss = torch.empty(N, dtype=torch.float32, device=logits.device)
        lse = torch.empty(N, dtype=torch.float32, device=logits.device)
        _ce_fwd[(N,)](logits, targets, loss, lse, logits.stride(0), V, ignore_index, BLOCK_V=_BLOCK_V)
        n_valid = (targets != ignore_index).sum().clamp(min=1)
        ctx.save_for_backward(logits, targets, lse, n_valid)
        ctx.ignore_index = ignore_index
        return loss.sum() / n_valid

    @staticmethod
    def backward(ctx, dloss: torch.Tensor):
        logits, targets, lse, n_valid = ctx.saved_tensors
        N, V = logits.shape
        dlogits = torch.empty_like(logits)
        scale = (dloss.float() / n_valid).reshape(1)  # a device tensor: no host sync in backward
        _ce_bwd[(N,)](logits, targets, lse, dlogits, scale, logits.stride(0), dlogits.stride(0), V, ctx.ignore_index,
                      BLOCK_V=_BLOCK_V)
        return dlogits, None, None


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Mean loss over targets != ignore_index; logits (N, V) in any float dtype, math in fp32."""
    return _CrossEntropy.apply(logits, targets, ignore_index)
