"""Fused SwiGLU nonlinearity, silu(gate) * up, in Triton.

Eager PyTorch materialises silu(gate) and saves it for backward; here forward writes only the product and
backward recomputes the sigmoid, trading a few FLOPs for one activation-sized buffer per block. One program per
(row, block of columns), row offsets in 64-bit; inputs keep any row stride.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from pretrain.kernels.rows import rows

_BLOCK = 1024


@triton.jit
def _swiglu_fwd(G, U, Y, stride_g, stride_u, N, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # 64-bit: row * stride passes 2^31 elements in large activations
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < N
    g = tl.load(G + row * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + row * stride_u + cols, mask=mask, other=0.0).to(tl.float32)
    y = g * tl.sigmoid(g) * u
    tl.store(Y + row * N + cols, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd(DY, G, U, DG, DU, stride_dy, stride_g, stride_u, N, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < N
    dy = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(G + row * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + row * stride_u + cols, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(g)
    silu = g * sig
    # d silu(g)/dg = sig * (1 + g * (1 - sig))
    tl.store(DG + row * N + cols, (dy * u * sig * (1.0 + g * (1.0 - sig))).to(DG.dtype.element_ty), mask=mask)
    tl.store(DU + row * N + cols, (dy * silu).to(DU.dtype.element_ty), mask=mask)


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        g2, u2 = rows(gate), rows(up)
        M, N = g2.shape
        y = torch.empty((M, N), dtype=gate.dtype, device=gate.device)
        _swiglu_fwd[(M, triton.cdiv(N, _BLOCK))](g2, u2, y, g2.stride(0), u2.stride(0), N, BLOCK=_BLOCK)
        ctx.save_for_backward(g2, u2)
        ctx.shape = gate.shape
        return y.view(gate.shape)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        g2, u2 = ctx.saved_tensors
        M, N = g2.shape
        dy2 = rows(dy)
        dg = torch.empty((M, N), dtype=g2.dtype, device=g2.device)
        du = torch.empty((M, N), dtype=u2.dtype, device=u2.device)
        _swiglu_bwd[(M, triton.cdiv(N, _BLOCK))](dy2, g2, u2, dg, du, dy2.stride(0), g2.stride(0), u2.stride(0), N,
                                                 BLOCK=_BLOCK)
        return dg.view(ctx.shape), du.view(ctx.shape)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return _SwiGLU.apply(gate, up)
