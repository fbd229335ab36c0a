"""The planner's activation bytes against what autograd really saves (one process, reference layers, CPU)."""
from __future__ import annotations

import pytest
import torch

from plan_common import BATCH, SEQ, VOCAB, block_args
from saved_bytes import SavedBytes
from pretrain.model.layers import REFERENCE
from pretrain.model.transformer import Transformer, TransformerBlock, _rope_table
from pretrain.plan.describe import Kernels, block_activations, head_activations

DTYPES = {"fp32": (torch.float32, 4), "bf16": (torch.bfloat16, 2)}


def _rope(args):
    return list(_rope_table(args.head_dim, args.max_seq_len, args.rope_theta, "cpu"))


@pytest.mark.parametrize("qk_norm", [False, True], ids=["llama", "qk_norm"])
@pytest.mark.parametrize("mode", ["none", "selective", "full"])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_block_saved_bytes_tp1(dtype, mode, qk_norm):
    args = block_args().replace(qk_norm=qk_norm)
    torch_dtype, a = DTYPES[dtype]
    block = TransformerBlock(args, REFERENCE, 0, mode).to(torch_dtype)
    x = torch.randn(BATCH, SEQ, args.dim, dtype=torch_dtype, requires_grad=True)
    with SavedBytes(exclude=[*block.parameters(), *_rope(args)]) as m:
        y = block(x)  # noqa: F841 (the graph, and what it saved, lives as long as its output)
    planned = block_activations(args, BATCH * SEQ, 1, False, mode, a, Kernels.cpu())[0]
    assert m.now == pytest.approx(planned, rel=0.10), f"measured {m.now} vs planned {planned}"


@pytest.mark.parametrize("mode", ["none", "selective", "full"])
def test_whole_model_saved_bytes_tp1(mode):
    """Blocks + final norm + the loss's saved log-softmax: the head term is right too."""
    args = block_args()
    model = Transformer(args, REFERENCE, mode).to(torch.bfloat16)
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ + 1))
    with SavedBytes(exclude=[*model.parameters(), *_rope(args)]) as m:
        loss = model(tokens[:, :-1], tokens[:, 1:])  # noqa: F841 (keeps the graph alive)
    k = Kernels.cpu()
    planned = (args.n_layers * block_activations(args, BATCH * SEQ, 1, False, mode, 2, k)[0]
               + head_activations(args, BATCH * SEQ, 1, False, 2, k)[0])
    assert m.now == pytest.approx(planned, rel=0.10), f"measured {m.now} vs planned {planned}"


def test_selective_is_not_none_and_sequence_parallel_splits_the_norms():
    """The errors the old estimate made: selective == none, everything divided by tp without SP, and the block
    inputs kept under full recompute not divided by tp with SP (8b shape, T = 8192, bf16, fused kernels)."""
    from pretrain.model.args import FLAVORS

    args, S, k = FLAVORS["8b"].replace(vocab_size=128256), 8192, Kernels()
    none, sel = (block_activations(args, S, 1, False, m, 2, k)[0] for m in ("none", "selective"))
    assert sel < 0.8 * none
    tp1 = block_activations(args, S, 1, False, "none", 2, k)[0]
    no_sp, sp = (block_activations(args, S, 8, s, "none", 2, k)[0] for s in (False, True))
    assert no_sp > 2 * tp1 / 8 and sp < no_sp / 2
    assert block_activations(args, S, 8, True, "full", 2, k)[0] == S * args.dim * 2 / 8


@pytest.mark.parametrize("mode,qk_norm", [("none", False), ("selective", False), ("none", True)])
def test_fused_kernels_saved_bytes_in_the_interpreter(monkeypatch, mode, qk_norm):
    """The fused path's figure (Triton RMSNorm, RoPE, SwiGLU, cross-entropy) from the tensors those kernels save:
    run for real in Triton's interpreter on CPU (fp32, numpy has no bf16), dispatched as on CUDA."""
    pytest.importorskip("triton")
    from pretrain import kernels

    monkeypatch.setattr(kernels, "_KERNELS", kernels.import_kernels())  # the CUDA dispatch, on CPU tensors
    monkeypatch.setattr(kernels, "_FUSED_DEVICE", "cpu")
    args = block_args().replace(qk_norm=qk_norm)
    model = Transformer(args, REFERENCE, mode)
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ + 1))
    with SavedBytes(exclude=[*model.parameters(), *_rope(args)]) as m:
        loss = model(tokens[:, :-1], tokens[:, 1:])  # noqa: F841 (keeps the graph alive)
    k = Kernels(fused=True)
    planned = (args.n_layers * block_activations(args, BATCH * SEQ, 1, False, mode, 4, k)[0]
               + head_activations(args, BATCH * SEQ, 1, False, 4, k)[0])
    assert m.now == pytest.approx(planned, rel=0.10), f"measured {m.now} vs planned {planned}"
    eager = (args.n_layers * block_activations(args, BATCH * SEQ, 1, False, mode, 4, Kernels.cpu())[0]
             + head_activations(args, BATCH * SEQ, 1, False, 4, Kernels.cpu())[0])
    if mode == "none":  # under selective the norms' and SwiGLU's tensors are recomputed, fused or not
        assert eager > 1.2 * planned  # what the fused kernels are for


def test_gqa_keys_and_values_are_saved_at_kv_head_width():
    """SDPA's enable_gqa: autograd keeps k and v with K heads; expanding them to H heads first (repeat_interleave)
    saved H/K times their bytes."""
    args = block_args()
    block = TransformerBlock(args, REFERENCE, 0, "none")
    x = torch.randn(BATCH, SEQ, args.dim, requires_grad=True)
    shapes = []

    def pack(t):
        shapes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = block(x)  # noqa: F841
    hd = args.head_dim
    assert shapes.count((BATCH, args.kv_heads, SEQ, hd)) == 2  # k, v as SDPA saves them
    assert shapes.count((BATCH, args.n_heads, SEQ, hd)) == 2  # q and the output only
