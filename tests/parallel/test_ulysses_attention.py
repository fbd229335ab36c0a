"""The Ulysses path (pretrain/parallel/context.py) in one process: DeepSpeed's DistributedAttention around the
model's CoreAttention, over a one-rank group, gives the core's own answer, and on CUDA it runs flash attention
(causal, and varlen flash for document masks). The multi-rank math is the parity table's cp rows."""
from __future__ import annotations

import contextlib
import socket

import pytest
import torch
import torch.distributed as dist

from pretrain.model import FLAVORS
from pretrain.model.documents import Documents
from pretrain.model.transformer import CoreAttention
from pretrain.parallel.context import UlyssesAttention


@contextlib.contextmanager
def one_rank_group(backend: str):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    import deepspeed

    deepspeed.init_distributed(dist_backend=backend)  # DistributedAttention's collectives go through deepspeed.comm
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("doc_mask", [False, True], ids=["causal", "documents"])
def test_ulysses_attention_is_the_core_attention_and_uses_flash_on_cuda(device, doc_mask):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    args = FLAVORS["debug"].replace(dim=256, n_heads=4, n_kv_heads=2, max_seq_len=512)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    g = torch.Generator().manual_seed(0)
    B, T, hd = 2, 256, args.head_dim
    q = torch.randn(B, T, 4, hd, generator=g).to(device, dtype).requires_grad_()
    k = torch.randn(B, T, 2, hd, generator=g).to(device, dtype).requires_grad_()
    v = torch.randn(B, T, 2, hd, generator=g).to(device, dtype).requires_grad_()
    docs = Documents.from_ids(torch.arange(T).div(100, rounding_mode="floor").expand(B, T)).to(device) \
        if doc_mask else None
    core = CoreAttention(args, layer_id=0)
    with one_rank_group("nccl" if device == "cuda" else "gloo") as group:
        ulysses = UlyssesAttention(core, group, n_kv_heads=2, kv_copies=1)
        # CUDA: flash only, so a path that cannot take flash (or falls back to the math kernel) fails loudly
        only_flash = sdpa_kernel([SDPBackend.FLASH_ATTENTION]) if device == "cuda" else contextlib.nullcontext()
        with only_flash:
            out = ulysses(q, k, v, docs)
            out.float().sum().backward()
        grads = [t.grad.clone() for t in (q, k, v)]
        for t in (q, k, v):
            t.grad = None
        with only_flash:
            want = core(q, k, v, docs)
            want.float().sum().backward()
    assert out.shape == (B, T, 4, hd)
    assert torch.equal(out, want)
    for got, t in zip(grads, (q, k, v)):
        assert torch.equal(got, t.grad)
