"""Fused RMSNorm (forward + backward) in Triton.

One program normalises one row in a single pass over HBM (the eager path reads x three times: square, mean,
scale). Backward recomputes x_hat from the saved 1/rms instead of storing it, and reduces the weight gradient
per program before a final small sum, so no (rows x dim) fp32 buffer is materialised. Row offsets are 64-bit
(row * stride passes 2^31 elements in a large activation), and any row stride is taken as it is.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from pretrain.kernels.rows import rows


@triton.jit
def _rmsnorm_fwd(X, W, Y, RSTD, stride_x, stride_y, N, eps, BLOCK_N: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / N + eps)
    tl.store(RSTD + row, rstd)
    tl.store(Y + row * stride_y + cols, (x * rstd * w).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _rmsnorm_bwd(DY, X, W, RSTD, DX, DW_PARTIAL, stride_dy, stride_x, stride_dx, M, N, ROWS_PER_PROG,
                 BLOCK_N: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_N], dtype=tl.float32)
    start = pid * ROWS_PER_PROG
    for i in range(0, ROWS_PER_PROG):
        row = start + i
        if row < M:
            x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
            rstd = tl.load(RSTD + row)
            x_hat = x * rstd
            wdy = w * dy
            # d/dx of x*rstd*w: rstd * (w*dy - x_hat * mean(w*dy*x_hat))
            c = tl.sum(wdy * x_hat, axis=0) / N
            dx = (wdy - x_hat * c) * rstd
            tl.store(DX + row * stride_dx + cols, dx.to(DX.dtype.element_ty), mask=mask)
            dw += dy * x_hat
    tl.store(DW_PARTIAL + pid * N + cols, dw, mask=mask)


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        shape = x.shape
        x2 = rows(x)
        M, N = x2.shape
        y = torch.empty((M, N), dtype=x.dtype, device=x.device)
        rstd = torch.empty(M, dtype=torch.float32, device=x.device)
        block = triton.next_power_of_2(N)
        _rmsnorm_fwd[(M,)](x2, weight, y, rstd, x2.stride(0), y.stride(0), N, eps, BLOCK_N=block)
        ctx.save_for_backward(x2, weight, rstd)
        ctx.shape = shape
        return y.view(shape)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x2, weight, rstd = ctx.saved_tensors
        M, N = x2.shape
        dy2 = rows(dy)
        dx = torch.empty((M, N), dtype=x2.dtype, device=x2.device)
        programs = max(1, min(M, 4 * _num_sms(x2.device)))
        rows_per_prog = triton.cdiv(M, programs)
        programs = triton.cdiv(M, rows_per_prog)
        dw_partial = torch.empty(programs, N, dtype=torch.float32, device=x2.device)
        _rmsnorm_bwd[(programs,)](dy2, x2, weight, rstd, dx, dw_partial, dy2.stride(0), x2.stride(0), dx.stride(0),
                                  M, N, rows_per_prog, BLOCK_N=triton.next_power_of_2(N))
        return dx.view(ctx.shape), dw_partial.sum(0).to(weight.dtype), None


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # the Triton interpreter on CPU (tests): a few programs exercise the multi-row loop


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return _RMSNorm.apply(x, weight, eps)
