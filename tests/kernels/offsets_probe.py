"""Runs every Triton kernel in Triton's interpreter on rows whose offsets pass 2^31 elements, and prints, per
kernel, the largest difference from the eager reference as JSON. A kernel that computes a row offset in 32-bit
reads and writes 8 GiB away from its row: a wrong value or a segfault (hence a separate process).

The rows are views with a row stride of 2^30 + 1 elements into a sparse memory-mapped file: 3 rows put the last
one at 2^31 + 2 elements, and only the pages the rows touch are ever allocated (a few KiB of an 8 GiB file).
Usage: TRITON_INTERPRET=1 python offsets_probe.py SCRATCH_DIR
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from pretrain import kernels as ref
from pretrain.kernels import triton_cross_entropy as ce
from pretrain.kernels import triton_rmsnorm as rms
from pretrain.kernels import triton_rope as rope
from pretrain.kernels import triton_swiglu as swi

ROWS, WIDTH, STRIDE = 3, 16, 2**30 + 1  # row 2 starts at element 2^31 + 2


class FarRows:
    """(ROWS, WIDTH) float32 views into one sparse file, each row STRIDE elements after the previous one."""

    def __init__(self, scratch: Path):
        size = (ROWS - 1) * STRIDE + 16 * WIDTH  # room for 16 views side by side
        path = scratch / "far_rows.bin"
        with open(path, "wb") as f:
            f.truncate(size * 4)
        self.store = torch.from_file(str(path), shared=True, size=size, dtype=torch.float32)
        self.used = 0

    def view(self, values: torch.Tensor | None = None) -> torch.Tensor:
        """A fresh (ROWS, WIDTH) view (each at its own column offset), filled with `values` when given."""
        v = self.store.as_strided((ROWS, WIDTH), (STRIDE, 1), storage_offset=self.used)
        self.used += WIDTH
        if values is not None:
            v.copy_(values)
        return v


def _diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().float() - b.detach().float()).abs().max())


def main(scratch: Path) -> dict[str, float]:
    torch.manual_seed(0)
    far, out = FarRows(scratch), {}
    x0, g0, u0, dy0 = (torch.randn(ROWS, WIDTH) for _ in range(4))
    w = 1 + 0.1 * torch.randn(WIDTH)

    # cross-entropy: loss rows and the gradient written in place (the chunked head), and the standalone backward
    t = torch.tensor([1, 5, 9])
    x, loss, lse, scale = far.view(x0), torch.empty(ROWS), torch.empty(ROWS), torch.full((ROWS,), 0.5)
    ce._ce_fwd[(ROWS,)](x, t, loss, lse, x, scale, STRIDE, STRIDE, WIDTH, -100, 0.0, BLOCK_V=16, WRITE_GRAD=True)
    want_grad = (torch.softmax(x0, -1) - F.one_hot(t, WIDTH)) * 0.5
    out["cross_entropy_fwd"] = max(_diff(loss, F.cross_entropy(x0, t, reduction="none")), _diff(x, want_grad))
    x, dx, one = far.view(x0), far.view(), torch.ones(1)
    ce._ce_bwd[(ROWS,)](x, t, torch.logsumexp(x0, -1), dx, one, STRIDE, STRIDE, WIDTH, -100, BLOCK_V=16)
    out["cross_entropy_bwd"] = _diff(dx, want_grad * 2)

    # RMSNorm forward and backward
    x, y, rstd = far.view(x0), far.view(), torch.empty(ROWS)
    rms._rmsnorm_fwd[(ROWS,)](x, w, y, rstd, STRIDE, STRIDE, WIDTH, 1e-5, BLOCK_N=WIDTH)
    x_ref = x0.clone().requires_grad_()
    y_ref = ref.rms_norm(x_ref, w, 1e-5)
    y_ref.backward(dy0)
    dy, dx, dw_partial = far.view(dy0), far.view(), torch.empty(ROWS, WIDTH)
    rms._rmsnorm_bwd[(ROWS,)](dy, x, w, rstd, dx, dw_partial, STRIDE, STRIDE, STRIDE, ROWS, WIDTH, 1, BLOCK_N=WIDTH)
    out["rmsnorm_fwd"] = _diff(y, y_ref)
    out["rmsnorm_bwd"] = _diff(dx, x_ref.grad)

    # RoPE: (B, T, H, D) = (ROWS, 1, 1, WIDTH), batch stride STRIDE, shared positions
    cos, sin = ref.rope_cache(WIDTH, 4, 10000.0)
    x, y = far.view(x0), far.view()
    rope._rope_kernel[(ROWS,)](x, cos, sin, y, 1, STRIDE, WIDTH, WIDTH, STRIDE, WIDTH, WIDTH, 0, cos.stride(0), 1,
                               HALF=WIDTH // 2, BLOCK_H=1, BLOCK_D=WIDTH // 2, SIGN=1.0)
    out["rope"] = _diff(y, ref.apply_rope(x0[:, None, None, :], cos[:1], sin[:1])[:, 0, 0])

    # SwiGLU forward and backward (outputs are contiguous; the inputs' rows are far apart)
    g, u, y = far.view(g0), far.view(u0), torch.empty(ROWS, WIDTH)
    swi._swiglu_fwd[(ROWS, 1)](g, u, y, STRIDE, STRIDE, WIDTH, BLOCK=16)
    g_ref, u_ref = g0.clone().requires_grad_(), u0.clone().requires_grad_()
    ref.swiglu(g_ref, u_ref).backward(dy0)
    dy, dg, du = far.view(dy0), torch.empty(ROWS, WIDTH), torch.empty(ROWS, WIDTH)
    swi._swiglu_bwd[(ROWS, 1)](dy, g, u, dg, du, STRIDE, STRIDE, STRIDE, WIDTH, BLOCK=16)
    out["swiglu_fwd"] = _diff(y, ref.swiglu(g0, u0))
    out["swiglu_bwd"] = max(_diff(dg, g_ref.grad), _diff(du, u_ref.grad))
    return out


if __name__ == "__main__":
    print(json.dumps(main(Path(sys.argv[1]))))
