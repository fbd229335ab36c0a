"""Document masking computes each document of a packed row exactly as it would be alone, at any offset in the row.

RoPE makes q.k depend only on the distance between two positions, so with the mask cutting attention at document
boundaries, restarting positions at each document (a `document_positions` switch) would change nothing but
rounding: seen here, at offsets up to 2005, the same 1e-7 either way. No such switch exists for that reason."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pretrain import kernels
from pretrain.kernels import varlen_attention
from pretrain.kernels.varlen_attention import causal_varlen_attention
from pretrain.model import FLAVORS, Transformer, init_model
from pretrain.model.documents import Documents


def test_a_packed_document_equals_the_document_alone():
    args = FLAVORS["debug"].replace(vocab_size=256)
    model = Transformer(args)
    init_model(model, args, seed=4)
    g = torch.Generator().manual_seed(0)
    docs = [torch.randint(0, 256, (n,), generator=g) for n in (5, 300, 7)]
    packed = torch.cat(docs)[None]  # (1, 312): the last document starts at position 305
    doc_ids = torch.cat([torch.full((len(d),), i) for i, d in enumerate(docs)])[None]
    with torch.no_grad():
        logits = model(packed, docs=doc_ids)[0]
        unmasked = model(packed)[0]
        alone = [model(d[None])[0] for d in docs]
    start = 0
    for d, ref in zip(docs, alone):
        torch.testing.assert_close(logits[start:start + len(d)], ref, atol=1e-5, rtol=1e-5)
        start += len(d)
    # the control: without the mask the later documents see the earlier ones
    assert not torch.allclose(unmasked[-7:], alone[-1], atol=1e-3)


# --------------------------------------------------------------------------- boundaries and the flash (varlen) path

def test_boundaries_are_runs_of_one_id_and_never_cross_a_row():
    ids = torch.tensor([[0, 0, 1, 1, 1, 2], [4, 4, 4, 4, 4, 4], [0, 1, 2, 3, 3, 3]])
    docs = Documents.from_ids(ids)
    # row 0: 2, 3, 1 tokens; row 1 is one document (ids need not start at 0); row 2: 1, 1, 1, 3
    assert docs.cu_seqlens.tolist() == [0, 2, 5, 6, 12, 13, 14, 15, 18]
    assert docs.cu_seqlens.dtype == torch.int32 and docs.max_len == 6
    # the same id in two rows is two documents: the dense reference agrees (no key outside the query's row)
    mask = docs.dense_mask()
    assert mask.shape == (3, 1, 6, 6) and not mask[0, 0, 2, 1] and mask[0, 0, 4, 2] and not mask[0, 0, 2, 3]


def _per_document_sdpa(q, k, v, cu_q, cu_k, max_q, max_k, *, window_size, enable_gqa=False):
    """What varlen flash attention computes, in plain SDPA one document at a time (torch >= 2.12's signature)."""
    assert tuple(window_size) == (-1, 0), "the caller must ask for causal attention"
    assert max_q == max_k == int((cu_q[1:] - cu_q[:-1]).max())
    out = torch.empty_like(q)
    for a, b in zip(cu_q[:-1].tolist(), cu_q[1:].tolist()):
        y = F.scaled_dot_product_attention(q[a:b].transpose(0, 1), k[a:b].transpose(0, 1), v[a:b].transpose(0, 1),
                                           is_causal=True, enable_gqa=enable_gqa)
        out[a:b] = y.transpose(0, 1)
    return out


def _per_document_sdpa_2_11(q, k, v, cu_q, cu_k, max_q, max_k, *, window_size):
    """torch 2.11's signature: `window_size`, no grouped-query heads."""
    assert q.shape[1] == k.shape[1], "without enable_gqa the kv heads must come expanded"
    return _per_document_sdpa(q, k, v, cu_q, cu_k, max_q, max_k, window_size=window_size)


def _per_document_sdpa_2_10(q, k, v, cu_q, cu_k, max_q, max_k, is_causal=False):
    """torch 2.10's signature: `is_causal`, no grouped-query heads."""
    assert is_causal and q.shape[1] == k.shape[1], "older torch needs causal asked by name and kv heads expanded"
    return _per_document_sdpa(q, k, v, cu_q, cu_k, max_q, max_k, window_size=(-1, 0))


@pytest.mark.parametrize("kernel", [_per_document_sdpa, _per_document_sdpa_2_11, _per_document_sdpa_2_10],
                         ids=["torch2.12+", "torch2.11", "torch2.10"])
def test_varlen_call_equals_the_dense_mask_forward_and_backward(kernel):
    """The flattening, cu_seqlens and keywords the CUDA path hands to flash attention give exactly the dense
    reference's outputs and gradients (grouped-query heads: 4 query heads over 2 kv heads)."""
    g = torch.Generator().manual_seed(3)
    B, T, H, K, hd = 3, 40, 4, 2, 8
    ids = torch.stack([torch.arange(T) // n for n in (7, 13, 40)])
    docs = Documents.from_ids(ids)
    q, k, v = (torch.randn(B, T, h, hd, generator=g, dtype=torch.float64, requires_grad=True) for h in (H, K, K))

    ref = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         attn_mask=docs.dense_mask(), enable_gqa=True).transpose(1, 2)
    grads_ref = torch.autograd.grad(ref.square().sum(), (q, k, v))
    out = causal_varlen_attention(q, k, v, docs.cu_seqlens, docs.max_len, fn=kernel)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))

    torch.testing.assert_close(out, ref)
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b)


def test_cpu_keeps_the_dense_reference_and_takes_ids_or_boundaries():
    args = FLAVORS["debug"].replace(vocab_size=256)
    model = Transformer(args)
    init_model(model, args, seed=4)
    tokens = torch.randint(0, 256, (2, 64), generator=torch.Generator().manual_seed(1))
    ids = torch.stack([torch.arange(64) // 10, torch.arange(64) // 33])
    assert not varlen_attention.available(torch.zeros(1, 1, 1, 8, dtype=torch.bfloat16))  # no CUDA here
    with torch.no_grad():
        torch.testing.assert_close(model(tokens, docs=ids), model(tokens, docs=Documents.from_ids(ids)))


@pytest.mark.gpu
def test_cuda_document_masking_runs_varlen_flash_and_matches_the_dense_mask(monkeypatch):
    """On CUDA in bf16 the model takes the varlen kernel (no (T, T) mask is built) and agrees with the dense-mask
    reference run in the same precision: loss to 1e-2 relative, every gradient in direction."""
    import copy

    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names: set[str] = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.add(str(func))
            return func(*args, **(kwargs or {}))

    args = FLAVORS["debug"].replace(vocab_size=512, dim=128, n_heads=4, n_kv_heads=2, max_seq_len=2048)
    model = Transformer(args)
    init_model(model, args, seed=5)
    model = model.cuda().to(torch.bfloat16)
    dense = copy.deepcopy(model)
    tokens = torch.randint(0, 512, (2, 2049), generator=torch.Generator().manual_seed(0)).cuda()
    ids = torch.stack([torch.arange(2048) // 300, torch.arange(2048) // 1000]).cuda()
    docs = Documents.from_ids(ids)

    with Ops() as ops:
        loss = model(tokens[:, :-1], tokens[:, 1:], docs)
    loss.backward()
    assert any("varlen" in n for n in ops.names), sorted(ops.names)
    assert not any("scaled_dot_product" in n for n in ops.names)

    monkeypatch.setattr(kernels.varlen_attention, "available", lambda q: False)  # the dense-mask reference
    dense_loss = dense(tokens[:, :-1], tokens[:, 1:], docs)
    dense_loss.backward()
    assert float(loss) == pytest.approx(float(dense_loss), rel=1e-2)
    for (name, a), b in zip(model.named_parameters(), dense.parameters()):
        cos = F.cosine_similarity(a.grad.flatten().float(), b.grad.flatten().float(), dim=0)
        assert cos > 0.99, f"{name}: gradient direction differs (cosine {float(cos):.4f})"
