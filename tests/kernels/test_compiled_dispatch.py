"""A transformer block compiled with fused kernels on is one graph: the dispatch in pretrain.kernels must be code
Dynamo traces (a graph break per RMSNorm/RoPE/SwiGLU would leave `model.compile` measuring eager code, and inside
a selective-recompute region drop the whole block to eager)."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from pretrain import kernels
from pretrain.model.args import ModelArgs
from pretrain.model.layers import REFERENCE
from pretrain.model.transformer import TransformerBlock

ARGS = ModelArgs(dim=64, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=256, ffn_hidden_dim=128, max_seq_len=32)


def _stand_ins(calls: list[str]) -> dict[str, SimpleNamespace]:
    """Eager ops in the Triton modules' place (Dynamo cannot trace Triton's CPU interpreter): what is under test is
    the dispatch around them, which is the same code on CUDA."""
    def op(name, fn):
        def run(*a):
            if not torch.compiler.is_compiling():  # a side effect inside checkpoint's region would stop tracing
                calls.append(name)
            return fn(*a)
        return run
    rms = lambda x, w, eps: (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)).type_as(x) * w  # noqa: E731
    return {"rmsnorm": SimpleNamespace(rms_norm=op("rmsnorm", rms)),
            "rope": SimpleNamespace(apply_rope=op("rope", lambda x, cos, sin: x * 1.0)),
            "swiglu": SimpleNamespace(swiglu=op("swiglu", lambda g, u: F.silu(g) * u)),
            "cross_entropy": SimpleNamespace()}


@pytest.mark.parametrize("mode", ["none", "selective"])
def test_a_block_with_fused_dispatch_compiles_without_graph_breaks(monkeypatch, mode):
    calls: list[str] = []
    monkeypatch.setattr(kernels, "_KERNELS", _stand_ins(calls))
    monkeypatch.setattr(kernels, "_FUSED_DEVICE", "cpu")
    torch._dynamo.reset()
    block = TransformerBlock(ARGS, REFERENCE, 0, mode)
    x = torch.randn(2, 16, ARGS.dim, requires_grad=True)
    block(x)
    assert {"rmsnorm", "rope", "swiglu"} <= set(calls), calls  # the fused path is the one taken
    explained = torch._dynamo.explain(block)(x)
    assert explained.graph_count == 1
    assert explained.graph_break_count == 0, [str(r.reason)[:300] for r in explained.break_reasons]


def test_switching_fused_kernels_on_imports_them_once_outside_the_ops():
    pytest.importorskip("triton")
    kernels.use_fused(True)
    try:
        assert set(kernels._KERNELS) == {"rmsnorm", "rope", "swiglu", "cross_entropy"}
        assert not kernels.fused_enabled(torch.zeros(1))  # CPU tensors keep the eager ops
    finally:
        kernels.use_fused(False)
    assert kernels._KERNELS == {}


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["none", "selective"])
def test_a_block_with_the_triton_kernels_compiles_without_graph_breaks_on_cuda(mode):
    kernels.use_fused(True)
    try:
        torch._dynamo.reset()
        block = TransformerBlock(ARGS, REFERENCE, 0, mode).cuda().to(torch.bfloat16)
        x = torch.randn(2, 16, ARGS.dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        explained = torch._dynamo.explain(block)(x)
    finally:
        kernels.use_fused(False)
    assert explained.graph_break_count == 0, [str(r.reason)[:300] for r in explained.break_reasons]
