"""The chunked output head + loss (pretrain.kernels.linear_cross_entropy) against the eager reference: the loss and
the gradients of the hidden states and the head weight, ignored targets, tied embeddings, the no-grad path; and
the point of it: no (tokens x vocab) tensor is ever made.

Chunk losses: plain PyTorch (the reference path, any device), the Triton kernel (in Triton's interpreter on CPU,
compiled on CUDA). Under tensor and pipeline parallelism the same head is in the parity table
(tests/parallel/test_parity.py, with small chunks).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from pretrain import kernels
from pretrain.kernels.linear_cross_entropy import EAGER, ZLoss, linear_cross_entropy
from pretrain.model import FLAVORS, Transformer, init_model


def _triton():
    pytest.importorskip("triton")
    from pretrain.kernels import triton_cross_entropy

    return triton_cross_entropy.chunk_loss


CHUNK_LOSSES = [
    pytest.param(lambda: EAGER, "cpu", torch.float32, 1e-5, id="eager-cpu-fp32"),
    pytest.param(lambda: EAGER, "cpu", torch.bfloat16, 3e-2, id="eager-cpu-bf16"),
    pytest.param(_triton, "cpu", torch.float32, 1e-5, id="triton-cpu-fp32-interpreter"),
    pytest.param(_triton, "cuda", torch.float32, 1e-4, id="triton-cuda-fp32", marks=pytest.mark.gpu),
    pytest.param(_triton, "cuda", torch.bfloat16, 3e-2, id="triton-cuda-bf16", marks=pytest.mark.gpu),
]


def _reference(h, w, t, z_loss=0.0):
    """Whole logits, fp32 loss (what the head computed before it ran in chunks); with `z_loss`, autograd through
    cross_entropy + z_loss * logsumexp^2, averaged over the same (non-ignored) targets."""
    h, w = h.detach().requires_grad_(), w.detach().requires_grad_()
    logits = (h @ w.t()).float()
    loss = F.cross_entropy(logits, t, ignore_index=-100)
    if z_loss:
        loss = loss + z_loss * torch.logsumexp(logits, dim=-1)[t != -100].pow(2).mean()
    loss.backward()
    return loss.detach(), h.grad, w.grad


@pytest.mark.parametrize("chunk", [0, 1, 7, 64])
@pytest.mark.parametrize("make, device, dtype, tol", CHUNK_LOSSES)
def test_loss_and_grads_equal_the_whole_logits_reference(make, device, dtype, tol, chunk):
    torch.manual_seed(0)
    N, D, V = 45, 32, 2500  # 45 = 6 chunks of 7 and a ragged 3; V > one Triton vocab block
    h = (torch.randn(N, D, device=device) * 0.5).to(dtype)
    w = (torch.randn(V, D, device=device) * 0.5).to(dtype)
    t = torch.randint(0, V, (N,), device=device)
    t[[4, 20]] = -100  # ignored targets count neither in the loss nor in its mean
    ref_loss, ref_dh, ref_dw = _reference(h, w, t)
    hc, wc = h.detach().requires_grad_(), w.detach().requires_grad_()
    loss = linear_cross_entropy(hc, wc, t, make(), chunk=chunk)
    (loss * 3).backward()  # the incoming gradient scales both saved gradients
    torch.testing.assert_close(loss.float(), ref_loss.float(), rtol=tol, atol=tol)
    for got, want in ((hc.grad, ref_dh), (wc.grad, ref_dw)):
        assert got.dtype == dtype
        torch.testing.assert_close(got.float(), 3 * want.float(), rtol=tol, atol=tol * float(want.abs().max()))


@pytest.mark.parametrize("chunk", [0, 7])
@pytest.mark.parametrize("make, device, dtype, tol", CHUNK_LOSSES)
def test_z_loss_adds_coef_times_lse_squared_to_the_loss_and_its_gradient(make, device, dtype, tol, chunk):
    """train.z_loss on every chunk loss: the loss and both gradients are autograd's through cross_entropy +
    coef * logsumexp^2, and the term the head records (the z_loss metric) is coef * mean(lse^2) over the targets."""
    torch.manual_seed(0)
    N, D, V, coef = 45, 32, 2500, 0.05
    h = (torch.randn(N, D, device=device) * 0.5).to(dtype)
    w = (torch.randn(V, D, device=device) * 0.5).to(dtype)
    t = torch.randint(0, V, (N,), device=device)
    t[[4, 20]] = -100
    ref_loss, ref_dh, ref_dw = _reference(h, w, t, coef)
    plain = _reference(h, w, t)[0]
    assert float(ref_loss - plain) > 0.1  # the term is not lost in the tolerance
    hc, wc = h.detach().requires_grad_(), w.detach().requires_grad_()
    z = ZLoss(coef)
    loss = linear_cross_entropy(hc, wc, t, make(), chunk=chunk, z_loss=z)
    (loss * 3).backward()
    torch.testing.assert_close(loss.float(), ref_loss.float(), rtol=tol, atol=tol)
    for got, want in ((hc.grad, ref_dh), (wc.grad, ref_dw)):
        torch.testing.assert_close(got.float(), 3 * want.float(), rtol=tol, atol=tol * float(want.abs().max()))
    term = z.take()
    assert not term.requires_grad and z.take() is None  # taken once
    torch.testing.assert_close(term.float(), (ref_loss - plain).float(), rtol=tol, atol=tol)


def test_model_adds_z_loss_in_training_only_and_never_to_scores():
    """train.z_loss in the model: training mode's loss is the cross-entropy + coef * mean(lse^2) (recorded by the
    head, once per forward); eval mode's (validation, the spike look-ahead) is the plain cross-entropy, and the
    evaluation scores stay plain log-probabilities."""
    args = FLAVORS["debug"].replace(vocab_size=384)
    tokens = torch.randint(0, 384, (2, 21), generator=torch.Generator().manual_seed(0))
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    model = Transformer(args, z_loss=0.01)
    init_model(model, args, seed=3)
    with torch.no_grad():
        logits = model(inputs).flatten(0, 1)
    ce = F.cross_entropy(logits, targets.flatten())
    z = 0.01 * torch.logsumexp(logits, dim=-1).pow(2).mean()
    loss = model(inputs, targets)
    torch.testing.assert_close(loss.detach(), ce + z)
    torch.testing.assert_close(model.output.z_loss.take(), z)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(inputs, targets), ce)
        scores = model(inputs, targets, scores=True)
    assert model.output.z_loss.take() is None
    log_p = torch.log_softmax(logits, dim=-1).gather(1, targets.flatten()[:, None]).squeeze(1)
    torch.testing.assert_close(scores[..., 0].flatten(), log_p, rtol=1e-5, atol=1e-5)


def test_no_grad_gives_the_loss_and_computes_no_gradient():
    torch.manual_seed(0)
    h, w, t = torch.randn(20, 8, requires_grad=True), torch.randn(50, 8, requires_grad=True), torch.randint(0, 50, (20,))
    with torch.no_grad():
        loss = linear_cross_entropy(h, w, t, EAGER, chunk=6)
    assert not loss.requires_grad
    torch.testing.assert_close(loss, F.cross_entropy(h.detach() @ w.detach().t(), t))


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_model_loss_and_every_gradient_equal_the_logits_reference(tied):
    """The model's head with targets (chunked) vs its own logits through F.cross_entropy: tied embeddings get
    the sum of both uses' gradients either way."""
    args = FLAVORS["debug"].replace(vocab_size=384, tie_embeddings=tied)
    tokens = torch.randint(0, 384, (3, 41), generator=torch.Generator().manual_seed(0))
    results = []
    for chunked in (False, True):
        model = Transformer(args)
        init_model(model, args, seed=3)
        kernels.use_loss_chunk(17)  # 120 tokens: 7 chunks, the last one ragged
        try:
            if chunked:
                loss = model(tokens[:, :-1], tokens[:, 1:])
            else:
                loss = F.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten())
        finally:
            kernels.use_loss_chunk(0)
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (ref_loss, ref_grads), (loss, grads) = results
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-6)
    assert grads.keys() == ref_grads.keys()
    for name, g in grads.items():
        torch.testing.assert_close(g, ref_grads[name], rtol=1e-5, atol=1e-6, msg=name)


class _LargestTensor(TorchDispatchMode):
    """The largest tensor (in elements) any op returns while active: forward and backward alike."""

    def __init__(self):
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.numel = max(self.numel, t.numel())
        return out


def test_the_model_never_makes_a_tokens_x_vocab_tensor():
    """Forward and backward of the loss: nothing as large as (tokens x vocab). The same probe sees it on the
    logits path, so it can fail."""
    V, chunk = 4096, 16
    args = FLAVORS["debug"].replace(vocab_size=V)
    model = Transformer(args)
    init_model(model, args, seed=1)
    tokens = torch.randint(0, V, (2, 65), generator=torch.Generator().manual_seed(0))
    N = tokens[:, 1:].numel()  # 128 tokens: N x V = 524,288 elements, twice the head weight
    kernels.use_loss_chunk(chunk)
    try:
        with _LargestTensor() as probe:
            model(tokens[:, :-1], tokens[:, 1:]).backward()
    finally:
        kernels.use_loss_chunk(0)
    assert probe.numel <= max(chunk * V, V * args.dim) < N * V
    with _LargestTensor() as logits_path:
        F.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten()).backward()
    assert logits_path.numel == N * V


@pytest.mark.gpu
def test_loss_head_at_32768_tokens_of_a_128k_vocabulary_on_cuda():
    """The 1b preset's micro-batch (8 x 4096 tokens, dim 2048, vocab 128256) in bf16 through the fused path: equal
    to the whole-logits reference, and the head's memory is the chunk's, not the 16 GiB of fp32 logits."""
    torch.manual_seed(0)
    N, D, V = 32768, 2048, 128256
    h = (torch.randn(N, D, device="cuda") * 0.02).to(torch.bfloat16)
    w = (torch.randn(V, D, device="cuda") * 0.02).to(torch.bfloat16)
    t = torch.randint(0, V, (N,), device="cuda")
    kernels.use_fused(True)
    try:
        hc, wc = h.detach().requires_grad_(), w.detach().requires_grad_()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        loss = kernels.linear_cross_entropy(hc, wc, t)
        loss.backward()
        head_peak = torch.cuda.max_memory_allocated() - before
    finally:
        kernels.use_fused(False)
    assert head_peak < 4 * 2**30, f"head peaked at {head_peak / 2**30:.2f} GiB"
    ref_loss, ref_dh, ref_dw = _reference(h, w, t)
    assert float(loss) == pytest.approx(float(ref_loss), rel=1e-3)
    for got, want in ((hc.grad, ref_dh), (wc.grad, ref_dw)):
        cos = F.cosine_similarity(got.float().flatten(), want.float().flatten(), dim=0)
        assert float(cos) > 0.999
        assert float(got.float().norm()) == pytest.approx(float(want.float().norm()), rel=1e-2)


@pytest.mark.gpu
def test_cross_entropy_rows_past_2_31_logits_elements_on_cuda():
    """16800 x 128256 bf16 logits (2.15e9 elements): crashed with an illegal memory access before the row offsets
    were 64-bit. The loss and the last rows' gradient against torch."""
    from pretrain.kernels import triton_cross_entropy

    torch.manual_seed(0)
    N, V = 16800, 128256
    logits = torch.randn(N, V, device="cuda", dtype=torch.bfloat16).requires_grad_()
    t = torch.randint(0, V, (N,), device="cuda")
    loss = triton_cross_entropy.cross_entropy(logits, t)
    loss.backward()
    with torch.no_grad():
        want = F.cross_entropy(logits.float(), t)
        tail = logits[-4:].float()
        g = (torch.softmax(tail, dim=-1) - F.one_hot(t[-4:], V).float()) / N
    assert float(loss) == pytest.approx(float(want), rel=1e-3)
    torch.testing.assert_close(logits.grad[-4:].float(), g, rtol=2e-2, atol=1e-7)


@pytest.mark.gpu
def test_chunks_of_dw_are_summed_in_fp32_without_rounding_each_on_cuda():
    """Each chunk's dW product goes into the fp32 sum unrounded (cuBLAS accumulates in fp32 into it): 64 chunks of
    bf16 inputs agree with the fp32 sum of fp32 products to fp32 accuracy, not to bf16's 3 digits."""
    from pretrain.kernels.linear_cross_entropy import _accumulate

    g = torch.Generator("cuda").manual_seed(0)
    acc = torch.zeros(256, 128, device="cuda")
    want = torch.zeros(256, 128, device="cuda", dtype=torch.float64)
    for _ in range(64):
        a = torch.randn(256, 32, device="cuda", generator=g).to(torch.bfloat16)
        b = torch.randn(32, 128, device="cuda", generator=g).to(torch.bfloat16)
        _accumulate(acc, a, b)
        want += a.double() @ b.double()
    err = float((acc.double() - want).abs().max() / want.abs().max())
    assert err < 1e-5, f"relative error {err:.2e}: products rounded to bf16 before the sum"
