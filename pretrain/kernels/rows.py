"""The 2-D row view the Triton kernels take: (rows, last dim) with unit stride along the last dim."""
from __future__ import annotations

import torch


def rows(x: torch.Tensor) -> torch.Tensor:
    """x as (-1, x.shape[-1]); a row stride (a view of a larger buffer) is kept, copied only when the last dim is
    not contiguous. The kernels compute row offsets in 64-bit, so any row stride is safe."""
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()
