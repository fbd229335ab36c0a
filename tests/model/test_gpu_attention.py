"""bf16 + flash attention on CUDA against the fp32 reference (skipped without CUDA)."""
from __future__ import annotations

import copy

import pytest
import torch

from pretrain.model import FLAVORS, Transformer, init_model


@pytest.mark.gpu
def test_bf16_flash_attention_matches_fp32_reference():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    args = FLAVORS["debug"].replace(vocab_size=512, dim=128, n_heads=4, n_kv_heads=2, max_seq_len=1024)
    ref = Transformer(args)
    init_model(ref, args, seed=5)
    ref = ref.cuda()
    fast = copy.deepcopy(ref).to(torch.bfloat16)
    tokens = torch.randint(0, 512, (4, 513), generator=torch.Generator().manual_seed(0)).cuda()

    with sdpa_kernel([SDPBackend.MATH]):
        torch.backends.cuda.matmul.allow_tf32 = False
        loss_ref = ref(tokens[:, :-1], tokens[:, 1:])
        loss_ref.backward()
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):  # fails loudly if flash cannot run this shape/dtype
        loss_fast = fast(tokens[:, :-1], tokens[:, 1:])
        loss_fast.backward()

    # bf16 has an 8-bit mantissa (~4e-3 relative per rounding): the loss agrees to ~1%, gradients in direction.
    assert float(loss_fast) == pytest.approx(float(loss_ref), rel=1e-2)
    for (name, p_ref), p_fast in zip(ref.named_parameters(), fast.parameters()):
        cos = torch.nn.functional.cosine_similarity(p_ref.grad.flatten().float(), p_fast.grad.flatten().float(),
                                                    dim=0)
        assert cos > 0.99, f"{name}: gradient direction differs (cosine {float(cos):.4f})"
        assert float(p_fast.grad.float().norm()) == pytest.approx(float(p_ref.grad.norm()), rel=5e-2), name
