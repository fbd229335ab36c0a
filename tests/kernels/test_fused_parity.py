"""Fused Triton kernels vs the eager reference ops in pretrain.kernels: forward values and all gradients.

On CPU the kernels run in Triton's interpreter (fp32: numpy has no bf16), which checks the kernel's arithmetic
and indexing; the `gpu` cases compile them for the GPU and also check bf16 within bf16 tolerance.
"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from pretrain import kernels as ref  # noqa: E402
from pretrain.kernels import triton_cross_entropy, triton_rmsnorm, triton_rope, triton_swiglu  # noqa: E402

CASES = [
    pytest.param("cpu", torch.float32, 1e-5, id="cpu-fp32-interpreter"),
    pytest.param("cuda", torch.float32, 1e-5, id="cuda-fp32", marks=pytest.mark.gpu),
    pytest.param("cuda", torch.bfloat16, 2e-2, id="cuda-bf16", marks=pytest.mark.gpu),
]


def _grads(fn, *inputs):
    """Output and input gradients of sum(fn(*inputs) * fixed random weights)."""
    leaves = [x.detach().clone().requires_grad_(x.is_floating_point()) for x in inputs]
    out = fn(*leaves)
    torch.manual_seed(7)
    probe = torch.randn(out.shape, dtype=torch.float32, device=out.device)
    (out.float() * probe).sum().backward()
    return out.detach().float(), [x.grad.float() if x.grad is not None else None for x in leaves]


def _assert_parity(fused, eager, *inputs, tol):
    out_f, grads_f = _grads(fused, *inputs)
    out_e, grads_e = _grads(eager, *inputs)
    torch.testing.assert_close(out_f, out_e, rtol=tol, atol=tol)
    for gf, ge in zip(grads_f, grads_e):
        if ge is not None:
            torch.testing.assert_close(gf, ge, rtol=tol, atol=tol * max(1.0, ge.abs().max().item()))


@pytest.mark.parametrize("device,dtype,tol", CASES)
def test_rmsnorm(device, dtype, tol):
    torch.manual_seed(0)
    x = torch.randn(3, 7, 96, device=device, dtype=dtype)  # 96: not a power of two, exercises the mask
    w = (1 + 0.1 * torch.randn(96, device=device)).to(dtype)
    _assert_parity(lambda a, b: triton_rmsnorm.rms_norm(a, b, 1e-5), lambda a, b: ref.rms_norm(a, b, 1e-5), x, w,
                   tol=tol)


@pytest.mark.parametrize("per_sample", [False, True], ids=["shared-positions", "per-sample-positions"])
@pytest.mark.parametrize("device,dtype,tol", CASES)
def test_rope(device, dtype, tol, per_sample):
    torch.manual_seed(0)
    B, T, H, D = 2, 5, 3, 16
    x = torch.randn(B, T, H, D, device=device, dtype=dtype)
    cos, sin = ref.rope_cache(D, 32, 10000.0, device=device)
    if per_sample:  # e.g. decoding at different offsets per row
        pos = torch.tensor([[3, 4, 5, 6, 7], [0, 1, 2, 0, 1]], device=device)
        cos, sin = cos[pos], sin[pos]
    else:
        cos, sin = cos[:T], sin[:T]
    _assert_parity(lambda a: triton_rope.apply_rope(a, cos, sin), lambda a: ref.apply_rope(a, cos, sin), x, tol=tol)


@pytest.mark.parametrize("device,dtype,tol", CASES)
def test_swiglu(device, dtype, tol):
    torch.manual_seed(0)
    g = torch.randn(4, 9, 50, device=device, dtype=dtype) * 3
    u = torch.randn(4, 9, 50, device=device, dtype=dtype)
    _assert_parity(triton_swiglu.swiglu, ref.swiglu, g, u, tol=tol)


@pytest.mark.parametrize("device,dtype,tol", CASES)
def test_cross_entropy(device, dtype, tol):
    torch.manual_seed(0)
    N, V = 12, 5000  # V > one vocab block: exercises the online log-sum-exp across blocks
    logits = (torch.randn(N, V, device=device) * 4).to(dtype)
    targets = torch.randint(0, V, (N,), device=device)
    targets[[2, 7]] = -100  # ignored positions count neither in the loss nor its mean
    _assert_parity(lambda a, t: triton_cross_entropy.cross_entropy(a, t).reshape(1),
                   lambda a, t: ref.cross_entropy(a, t).reshape(1), logits, targets, tol=tol)


@pytest.mark.parametrize("z_loss", [0.0, 0.05], ids=["plain", "z_loss"])
@pytest.mark.parametrize("device,dtype,tol", CASES)
def test_chunk_loss_rows_lse_and_gradient_with_z_loss(device, dtype, tol, z_loss):
    """The chunked head's Triton ChunkLoss against the eager one, and both against autograd through
    cross_entropy + z_loss * logsumexp^2: loss rows (plain cross-entropy), lse rows, and the gradient over the
    logits of the scaled rows with z-loss (softmax * (1 + 2 z_loss lse) - onehot), written in place."""
    from pretrain.kernels.linear_cross_entropy import EAGER

    torch.manual_seed(0)
    N, V = 12, 5000  # V > one vocab block: the online log-sum-exp across blocks, the gradient pass per block
    logits = (torch.randn(N, V, device=device) * 4).to(dtype)
    targets = torch.randint(0, V, (N,), device=device)
    scale = torch.rand(N, device=device)
    leaf = logits.detach().float().requires_grad_()
    lse = torch.logsumexp(leaf, dim=-1)
    rows = torch.nn.functional.cross_entropy(leaf, targets, reduction="none")
    ((rows + z_loss * lse * lse) * scale).sum().backward()
    for chunk_loss in (triton_cross_entropy.chunk_loss, EAGER):
        got_rows, got_lse, grad = chunk_loss(logits.clone(), targets, scale, z_loss)
        torch.testing.assert_close(got_rows, rows.detach(), rtol=tol, atol=tol)
        torch.testing.assert_close(got_lse, lse.detach(), rtol=tol, atol=tol)
        assert grad.dtype == dtype
        torch.testing.assert_close(grad.float(), leaf.grad, rtol=tol, atol=tol * float(leaf.grad.abs().max()))


@pytest.mark.gpu
def test_model_uses_fused_kernels_on_cuda_and_matches_eager():
    """The dispatch point: a debug model's loss and grads with fused kernels on == off (fp32, CUDA)."""
    from pretrain.kernels import use_fused
    from pretrain.model import FLAVORS, Transformer, init_model

    args = FLAVORS["debug"].replace(vocab_size=512)
    tokens = torch.randint(0, 512, (2, 65), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    results = []
    for fused in (False, True):
        use_fused(fused)
        model = Transformer(args).cuda()
        init_model(model, args, seed=1)
        loss = model(tokens[:, :-1], tokens[:, 1:])
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    use_fused(False)
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-5, atol=1e-5)
    for g_fused, g_eager in zip(results[1][1], results[0][1]):
        torch.testing.assert_close(g_fused, g_eager, rtol=1e-4, atol=1e-5)
