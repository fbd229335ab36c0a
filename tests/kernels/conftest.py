"""Kernel tests run the Triton kernels for real: compiled on CUDA, or in Triton's interpreter on CPU.

TRITON_INTERPRET must be set before a kernel is decorated, i.e. before pretrain.kernels.triton_* is imported.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
