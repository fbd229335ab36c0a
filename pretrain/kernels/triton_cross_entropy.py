"""Fused softmax cross-entropy over a large vocabulary in Triton.

The eager path upcasts the whole (tokens x vocab) logits to fp32 and keeps the softmax for backward. Here forward
streams each row once in vocab blocks with an online log-sum-exp and saves one float per row; backward recomputes
softmax block by block. `chunk_loss` serves the chunked output head (pretrain.kernels.linear_cross_entropy): one
launch computes a chunk's loss rows and log-sum-exps and writes their gradient over the logits, in place, in the
logits' dtype; with z-loss (`Z_LOSS` > 0, the gradient of loss + Z_LOSS * lse^2) each row's softmax is scaled by
1 + 2 * Z_LOSS * lse in the same pass.

Row offsets are 64-bit: row * row_stride passes 2^31 elements at 16,800 rows of a 128k vocabulary.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from pretrain.kernels.rows import rows
from pretrain.model.loss_chunks import bytes_per_logit

_BLOCK_V = 2048


@triton.jit
def _ce_fwd(LOGITS, TARGETS, LOSS, LSE, DLOGITS, SCALE, stride_l, stride_d, V, ignore_index, Z_LOSS,
            BLOCK_V: tl.constexpr, WRITE_GRAD: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
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
    if WRITE_GRAD:  # the chunked head: (softmax * (1 + 2 Z_LOSS lse) - onehot) * scale[row], over the logits read
        g = tl.where(valid, tl.load(SCALE + row), 0.0)
        z = 1.0 + 2.0 * Z_LOSS * lse  # d(Z_LOSS * lse^2)/dx = 2 Z_LOSS lse softmax(x); exactly 1 without z-loss
        out = DLOGITS + row * stride_d
        for start in range(0, V, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            mask = cols < V
            x = tl.load(base + cols, mask=mask, other=0.0).to(tl.float32)
            grad = (tl.exp(x - lse) * z - tl.where(cols == target, 1.0, 0.0)) * g
            tl.store(out + cols, grad.to(DLOGITS.dtype.element_ty), mask=mask)


@triton.jit
def _ce_bwd(LOGITS, TARGETS, LSE, DLOGITS, SCALE, stride_l, stride_d, V, ignore_index, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
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
        logits = rows(logits)
        targets = targets.contiguous()
        N, V = logits.shape
        loss = torch.empty(N, dtype=torch.float32, device=logits.device)
        lse = torch.empty(N, dtype=torch.float32, device=logits.device)
        _ce_fwd[(N,)](logits, targets, loss, lse, logits, lse, logits.stride(0), 0, V, ignore_index, 0.0,
                      BLOCK_V=_BLOCK_V, WRITE_GRAD=False)
        n_valid = (targets != ignore_index).sum().clamp(min=1)
        ctx.save_for_backward(logits, targets, lse, n_valid)
        ctx.ignore_index = ignore_index
        return loss.sum() / n_valid

    @staticmethod
    def backward(ctx, dloss: torch.Tensor):
        logits, targets, lse, n_valid = ctx.saved_tensors
        N, V = logits.shape
        dlogits = torch.empty((N, V), dtype=logits.dtype, device=logits.device)
        scale = (dloss.float() / n_valid).reshape(1)  # a device tensor: no host sync in backward
        _ce_bwd[(N,)](logits, targets, lse, dlogits, scale, logits.stride(0), dlogits.stride(0), V, ctx.ignore_index,
                      BLOCK_V=_BLOCK_V)
        return dlogits, None, None


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Mean loss over targets != ignore_index; logits (N, V) in any float dtype, math in fp32."""
    return _CrossEntropy.apply(logits, targets, ignore_index)


class TritonChunkLoss:
    """pretrain.kernels.linear_cross_entropy's ChunkLoss on CUDA: one pass for the loss and log-sum-exp, one
    writing the gradient over the chunk's logits (no fp32 copy: the chunk's bytes are the logits' own)."""

    def bytes_per_logit(self, dtype: torch.dtype) -> int:
        return bytes_per_logit(dtype.itemsize, in_place=True)

    def __call__(self, logits, targets, grad_scale, z_loss=0.0):
        logits = rows(logits)
        N, V = logits.shape
        loss, lse = torch.empty((2, N), dtype=torch.float32, device=logits.device)
        write = grad_scale is not None
        scale = grad_scale.contiguous() if write else lse  # unread when not writing
        _ce_fwd[(N,)](logits, targets.contiguous(), loss, lse, logits, scale, logits.stride(0), logits.stride(0),
                      V, -1, float(z_loss), BLOCK_V=_BLOCK_V, WRITE_GRAD=write)
        return loss, lse, logits if write else None


chunk_loss = TritonChunkLoss()
