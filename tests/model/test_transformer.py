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


def test_parameter_count_matches_args():
    for tie in (False, True):
        model = build(tie_embeddings=tie)
        n = sum(p.numel() for p in model.parameters())
        assert n == ARGS.replace(tie_embeddings=tie).num_params()


def test_llama_parameter_names():
    from pretrain.model.init import reference_shapes

    params = {n: tuple(p.shape) for n, p in build().named_parameters()}
    assert params == reference_shapes(ARGS)
    assert "layers.1.attention.wq.weight" in params and "layers.0.feed_forward.w3.weight" in params


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


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_activation_checkpointing_same_loss_and_grads(mode):
    tokens = torch.randint(0, 128, (2, 17), generator=torch.Generator().manual_seed(1))
    plain = build()
    ckpt = Transformer(ARGS, checkpointing=mode)
    ckpt.load_state_dict(plain.state_dict())
    losses = []
    for m in (plain, ckpt):
        loss = m(tokens[:, :-1], tokens[:, 1:])
        loss.backward()
        losses.append(loss)
    assert torch.equal(losses[0], losses[1])
    for (n, a), b in zip(plain.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=0, msg=n)


def test_kv_cache_logits_match_full_forward():
    model = build().eval()
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
