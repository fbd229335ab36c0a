"""The fused-kernel measurement runs the Triton kernels in Triton's interpreter on CPU: TRITON_INTERPRET must be
set before pretrain.kernels.triton_* is imported (as in tests/kernels)."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
