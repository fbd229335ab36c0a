"""The reference model: shapes, init, masking, activation checkpointing, KV-cache generation."""
from __future__ import annotations

import pytest
import torch

from pretrain.model import FLAVORS, Transformer, init_model
from pretrain.model.generate import Sampling, generate

ARGS = FLAVORS["debug"].replace(vocab_size=128, n_layers=2)


def build(seed: int = 0, **changes) -> Transformer:
    args = ARGS.replace(**changes)
    model = Transformer(args)
    init_model(model, args, seed)
    return model


@pytest.mark.parametrize("qk_norm", [False, True], ids=["llama", "qk_norm"])
def test_parameter_count_matches_args(qk_norm):
    for tie in (False, True):
        model = build(tie_embeddings=tie, qk_norm=qk_norm)
        n = sum(p.numel() for p in model.parameters())
        assert n == ARGS.replace(tie_embeddings=tie, qk_norm=qk_norm).num_params()


@pytest.mark.parametrize("qk_norm", [False, True], ids=["llama", "qk_norm"])
def test_llama_parameter_names(qk_norm):
    from pretrain.model.init import reference_shapes

    params = {n: tuple(p.shape) for n, p in build(qk_norm=qk_norm).named_parameters()}
    assert params == reference_shapes(ARGS.replace(qk_norm=qk_norm))
    assert "layers.1.attention.wq.weight" in params and "layers.0.feed_forward.w3.weight" in params
    assert ("layers.1.attention.q_norm.weight" in params) == qk_norm
    if qk_norm:  # one weight of head_dim per block for the queries, one for the keys, starting at one
        hd = ARGS.head_dim
        assert params["layers.0.attention.k_norm.weight"] == (hd,)
        assert torch.equal(build(qk_norm=True).layers["1"].attention.q_norm.weight, torch.ones(hd))


def test_qk_norm_normalises_each_head_before_rope():
    """With QK-norm a head's attention logits do not depend on the scale of its query and key projections (RMSNorm
    divides it out, eps aside); without it they do. And it is the per-head RMSNorm Qwen3 writes, before RoPE:
    one block's attention against the formula spelled out."""
    tokens = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(4))
    for qk_norm in (True, False):
        model = build(qk_norm=qk_norm).eval()
        with torch.no_grad():
            before = model(tokens)
            for block in model.layers.values():
                block.attention.wq.weight.mul_(8.0)
                block.attention.wk.weight.mul_(4.0)
            after = model(tokens)
        moved = float((after - before).abs().max())  # seen: 8.9e-5 with QK-norm (eps), 0.14 without
        assert (moved < 1e-3) == qk_norm, moved

    import torch.nn.functional as F

    from pretrain import kernels

    model = build(qk_norm=True)
    attn = model.layers["0"].attention
    with torch.no_grad():
        attn.q_norm.weight.copy_(1 + 0.1 * torch.randn(ARGS.head_dim))
        attn.k_norm.weight.copy_(1 + 0.1 * torch.randn(ARGS.head_dim))
        x = torch.randn(2, 9, ARGS.dim)
        B, T, H, K, hd = 2, 9, attn.n_heads, attn.n_kv_heads, attn.head_dim

        def norm(t, w):
            return t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + ARGS.norm_eps) * w

        q = norm(attn.wq(x).view(B, T, H, hd), attn.q_norm.weight)
        k = norm(attn.wk(x).view(B, T, K, hd), attn.k_norm.weight)
        cos, sin = kernels.rope_cache(hd, T, ARGS.rope_theta)
        q, k = kernels.apply_rope(q, cos, sin), kernels.apply_rope(k, cos, sin)
        v = attn.wv(x).view(B, T, K, hd)
        k, v = k.repeat_interleave(H // K, dim=2), v.repeat_interleave(H // K, dim=2)
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        want = attn.wo(y.transpose(1, 2).reshape(B, T, H * hd))
        torch.testing.assert_close(attn(x), want, atol=1e-5, rtol=1e-5)


def test_init_is_seeded_and_per_name():
    a, b, c = build(0), build(0), build(1)
    for (n, pa), pb, pc in zip(a.named_parameters(), b.parameters(), c.parameters()):
        assert torch.equal(pa, pb), n
        if "norm" not in n:
            assert not torch.equal(pa, pc), n
    # A block's init does not depend on how many blocks exist (what makes pipeline stages agree).
    deeper = build(0, n_layers=3)
    assert torch.equal(deeper.layers["1"].attention.wq.weight, a.layers["1"].attention.wq.weight)
    # Residual-stream projections get the depth-scaled std.
    wo, wq = a.layers["0"].attention.wo.weight, a.layers["0"].attention.wq.weight
    assert wo.std() < 0.7 * wq.std()


def test_causality_and_document_mask():
    model = build().eval()
    g = torch.Generator().manual_seed(0)
    doc_a, doc_b = torch.randint(0, 128, (1, 7), generator=g), torch.randint(0, 128, (1, 9), generator=g)
    packed = torch.cat([doc_a, doc_b], dim=1)
    doc_ids = torch.tensor([[0] * 7 + [1] * 9])
    with torch.no_grad():
        masked = model(packed, docs=doc_ids)
        alone_a, alone_b = model(doc_a), model(doc_b)
        unmasked = model(packed)
    # Block-diagonal: the second document's logits are those of the document alone (RoPE is relative).
    torch.testing.assert_close(masked[:, 7:], alone_b, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(masked[:, :7], alone_a, atol=2e-5, rtol=1e-4)
    assert not torch.allclose(unmasked[:, 7:], alone_b, atol=1e-3)
    # Causal: a prefix's logits do not depend on what follows it.
    torch.testing.assert_close(unmasked[:, :7], alone_a, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("qk_norm", [False, True], ids=["llama", "qk_norm"])
@pytest.mark.parametrize("mode", ["full", "selective"])
def test_activation_checkpointing_same_loss_and_grads(mode, qk_norm):
    tokens = torch.randint(0, 128, (2, 17), generator=torch.Generator().manual_seed(1))
    plain = build(qk_norm=qk_norm)
    ckpt = Transformer(plain.args, checkpointing=mode)
    ckpt.load_state_dict(plain.state_dict())
    losses = []
    for m in (plain, ckpt):
        loss = m(tokens[:, :-1], tokens[:, 1:])
        loss.backward()
        losses.append(loss)
    assert torch.equal(losses[0], losses[1])
    for (n, a), b in zip(plain.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=0, msg=n)


@pytest.mark.parametrize("qk_norm", [False, True], ids=["llama", "qk_norm"])
def test_kv_cache_logits_match_full_forward(qk_norm):
    model = build(qk_norm=qk_norm).eval()
    tokens = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(tokens)
        cache = model.new_cache(2, 12)
        prefill = model(tokens[:, :5], start_pos=0, cache=cache)
        chunk = model(tokens[:, 5:8], start_pos=5, cache=cache)  # several new tokens at once
        steps = [model(tokens[:, i:i + 1], start_pos=i, cache=cache) for i in range(8, 12)]
    incremental = torch.cat([prefill, chunk, *steps], dim=1)
    torch.testing.assert_close(incremental, full, atol=2e-5, rtol=1e-4)


def test_cached_generation_equals_uncached_greedy():
    model = build()
    prompt = [3, 17, 42, 5]
    cached = generate(model, prompt, 20, Sampling(temperature=0.0))
    uncached = generate(model, prompt, 20, Sampling(temperature=0.0), use_cache=False)
    assert cached == uncached and len(cached) == 20


def test_sampling_options():
    model = build()
    prompt = [1, 2, 3]
    greedy = generate(model, prompt, 8, Sampling(0.0))
    assert generate(model, prompt, 8, Sampling(1.0, top_k=1), seed=0) == greedy
    assert generate(model, prompt, 8, Sampling(1.0, top_p=1e-6), seed=0) == greedy
    a = generate(model, prompt, 8, Sampling(1.5, top_k=50, top_p=0.95), seed=7)
    assert a == generate(model, prompt, 8, Sampling(1.5, top_k=50, top_p=0.95), seed=7)
    # Stops at (and includes) eos.
    eos = greedy[2]
    out = generate(model, prompt, 8, Sampling(0.0), eos_id=eos)
    assert out[-1] == eos and len(out) == greedy.index(eos) + 1
    with pytest.raises(ValueError, match="max_seq_len"):
        generate(model, prompt, ARGS.max_seq_len, Sampling(0.0))
    with pytest.raises(ValueError, match="top_p"):
        Sampling(1.0, top_p=0.0)
