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


@pytest.mark.parametrize("mode,qk_norm", [("none", False), ("selective", False), ("selective", True)])
def test_a_block_with_fused_dispatch_compiles_without_graph_breaks(monkeypatch, mode, qk_norm):
    calls: list[str] = []
    monkeypatch.setattr(kernels, "_KERNELS", _stand_ins(calls))
    monkeypatch.setattr(kernels, "_FUSED_DEVICE", "cpu")
    torch._dynamo.reset()
    block = TransformerBlock(ARGS.replace(qk_norm=qk_norm), REFERENCE, 0, mode)
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
@pytest.mark.parametrize("mode,qk_norm", [("none", False), ("selective", False), ("selective", True)])
def test_a_block_with_the_triton_kernels_compiles_without_graph_breaks_on_cuda(mode, qk_norm):
    kernels.use_fused(True)
    try:
        torch._dynamo.reset()
        block = TransformerBlock(ARGS.replace(qk_norm=qk_norm), REFERENCE, 0, mode).cuda().to(torch.bfloat16)
        x = torch.randn(2, 16, ARGS.dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        explained = torch._dynamo.explain(block)(x)
    finally:
        kernels.use_fused(False)
    assert explained.graph_break_count == 0, [str(r.reason)[:300] for r in explained.break_reasons]


@pytest.mark.slow  # inductor compiles the block's forward and backward on CPU: 4-13 s
def test_a_compiled_qk_norm_block_computes_the_eager_block():
    """model.compile with model.qk_norm: the block torch.compile'd (inductor, CPU) gives the eager block's output
    and every gradient, the QK-norm weights' included."""
    torch._dynamo.reset()
    args = ARGS.replace(qk_norm=True)
    eager = TransformerBlock(args, REFERENCE, 0, "selective")
    with torch.no_grad():
        for p in eager.parameters():
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.1 + (p.ndim == 1))
    compiled = TransformerBlock(args, REFERENCE, 0, "selective")
    compiled.load_state_dict(eager.state_dict())
    compiled.compile()
    x = torch.randn(2, 16, args.dim)
    outs = []
    for block in (eager, compiled):
        xi = x.clone().requires_grad_()
        y = block(xi)
        y.square().sum().backward()
        outs.append((y.detach(), xi.grad, {n: p.grad for n, p in block.named_parameters()}))
    (y0, dx0, g0), (y1, dx1, g1) = outs
    assert "attention.q_norm.weight" in g1
    # Relative to the largest entry: inductor fuses and reorders fp32 sums (seen: <= 1.5e-6 of it).
    for name, got, want in [("output", y1, y0), ("input grad", dx1, dx0), *((n, g1[n], g) for n, g in g0.items())]:
        assert float((got - want).abs().max()) <= 1e-5 * float(want.abs().max()), name
