"""Fused rotary position embedding (rotate-half convention) in Triton.

One program rotates every head of one (batch, position) row in place of the eager path's four temporaries
(two halves, the concatenation, two products). The backward is the same rotation by the negated angle, so one
kernel serves both directions.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rope_kernel(X, COS, SIN, Y, T, stride_xb, stride_xt, stride_xh, stride_yb, stride_yt, stride_yh, stride_cb,
                 stride_ct, H, HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, SIGN: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # one (b, t) pair; offsets in int64 (they pass 2^31 in large activations)
    b = row // T
    t = row % T
    heads = tl.arange(0, BLOCK_H)[:, None]
    dims = tl.arange(0, BLOCK_D)[None, :]
    mask = (heads < H) & (dims < HALF)
    c = tl.load(COS + b * stride_cb + t * stride_ct + dims, mask=dims < HALF, other=0.0).to(tl.float32)
    s = tl.load(SIN + b * stride_cb + t * stride_ct + dims, mask=dims < HALF, other=0.0).to(tl.float32) * SIGN
    base = X + b * stride_xb + t * stride_xt + heads * stride_xh
    x1 = tl.load(base + dims, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(base + HALF + dims, mask=mask, other=0.0).to(tl.float32)
    out = Y + b * stride_yb + t * stride_yt + heads * stride_yh
    # (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin): rotate_half(x) = (-x2, x1).
    tl.store(out + dims, (x1 * c - x2 * s).to(Y.dtype.element_ty), mask=mask)
    tl.store(out + HALF + dims, (x2 * c + x1 * s).to(Y.dtype.element_ty), mask=mask)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, sign: float) -> torch.Tensor:
    B, T, H, D = x.shape
    if x.stride(-1) != 1:
        x = x.contiguous()  # any other stride is taken as it is (e.g. q, k as views of one fused projection)
    y = torch.empty((B, T, H, D), dtype=x.dtype, device=x.device)
    if cos.dim() == 2:  # (T, D): shared by the batch
        cos, sin = cos[:T].contiguous(), sin[:T].contiguous()
        stride_cb, stride_ct = 0, cos.stride(0)
    else:  # (B, T, D): per-sample positions (document masking, KV-cache decoding)
        cos, sin = cos.contiguous(), sin.contiguous()
        stride_cb, stride_ct = cos.stride(0), cos.stride(1)
    _rope_kernel[(B * T,)](x, cos, sin, y, T, *x.stride()[:3], *y.stride()[:3], stride_cb, stride_ct, H,
                           HALF=D // 2, BLOCK_H=triton.next_power_of_2(H), BLOCK_D=triton.next_power_of_2(D // 2),
                           SIGN=sign)
    return y


class _RoPE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        return _rotate(x, cos, sin, 1.0)

    @staticmethod
    def backward(ctx, dy):
        cos, sin = ctx.saved_tensors
        return _rotate(dy, cos, sin, -1.0), None, None


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, T, H, hd); cos/sin (T, hd) or (B, T, hd) as built by `pretrain.kernels.rope_cache`."""
    return _RoPE.apply(x, cos, sin)
