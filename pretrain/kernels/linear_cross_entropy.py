"""Output projection + cross-entropy in token chunks: the (tokens x vocab) logits never exist whole.

With a 128k vocabulary the logits of one micro-batch are the largest tensor of a step (8 x 4096 tokens x 128256
entries: 7.8 GiB in bf16, twice that as the fp32 copy a loss makes), larger than every block's activations
together. Here each chunk of `c` tokens computes logits_c = h_c W^T, its loss rows and d loss / d logits_c
(softmax minus one-hot, scaled) at once, and takes the chunk's share of dh and dW right away, so one (c x V)
buffer is alive at a time.

The gradients are computed in forward, as Liger-Kernel's fused linear cross-entropy does: the head costs the same
three matmuls as the unfused one (logits, dh, dW) and backward only scales the saved dh and dW by the incoming
gradient. Apple's cut-cross-entropy instead recomputes the logits in backward (a fourth matmul, 2*N*D*V FLOPs,
about 6% of a 1B model's step at a 128k vocabulary). What lives from forward to backward is dh (N x D) and dW
(V x D) in the input's dtype instead of the logits; dW is summed over chunks in fp32 (on CUDA each chunk's product
is accumulated by cuBLAS in fp32 straight into the sum) and rounded once.

How a chunk's loss and gradient are computed is a `ChunkLoss`: plain PyTorch here (the reference, any device),
the Triton kernel on CUDA (`triton_cross_entropy.chunk_loss`), megatron-core's vocab-parallel steps under tensor
parallelism (`pretrain.parallel.tensor`).

Z-loss (PaLM, Chowdhery et al. 2022; `train.z_loss`): coef * lse^2 per target is added to the loss,
lse = log Z = log sum_v exp(logit_v), the softmax's log-normaliser over the whole vocabulary, averaged over the
same targets as the cross-entropy. The softmax ignores a shift of all logits; this term does not, and pulls log Z
toward 0, so the logits cannot drift together to magnitudes where bf16 rounds them coarsely. Its gradient is
d(coef * lse^2)/d logits = 2 * coef * lse * softmax, so a chunk's logits' gradient becomes
softmax * (1 + 2 * coef * lse) - onehot(target): the same one pass over the chunk, one scale per row more. Every
`ChunkLoss` returns lse per row (which it has anyway), and the head sums the term beside the loss (`ZLoss`).
"""
from __future__ import annotations

import functools
from typing import Protocol

import torch

from pretrain.model.loss_chunks import bytes_per_logit, chunk_tokens


class ChunkLoss(Protocol):
    """Loss rows, log-normalisers and d(sum of scaled rows)/d logits of one chunk, over this rank's slice of the
    vocabulary."""

    def bytes_per_logit(self, dtype: torch.dtype) -> int:
        """Working bytes per logit entry: sizes the chunks."""

    def __call__(self, logits: torch.Tensor, targets: torch.Tensor, grad_scale: torch.Tensor | None,
                 z_loss: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """logits (c, V_local), which the call may overwrite; targets (c,) in [0, V) (ignored rows already
        replaced, their loss and scale are masked by the caller); grad_scale (c,) fp32, None when no gradient is
        wanted; z_loss: the coefficient of z-loss in the rows the gradient is of (0: none). Returns the
        cross-entropy rows (c,) fp32 (no z-loss in them), lse rows (c,) fp32 (log-sum-exp over the whole
        vocabulary) and the gradient of rows + z_loss * lse^2 over the logits (c, V_local) in logits' dtype, or
        None."""


class EagerChunkLoss:
    """The reference: fp32 softmax in plain PyTorch, computed in place on an fp32 copy of the chunk."""

    def bytes_per_logit(self, dtype: torch.dtype) -> int:
        return bytes_per_logit(dtype.itemsize, in_place=False)

    def __call__(self, logits, targets, grad_scale, z_loss=0.0):
        x = logits.float()  # (c, V) fp32; the same tensor when logits are fp32 (a temporary of ours)
        rows = torch.arange(x.shape[0], device=x.device)
        target_logit = x[rows, targets]
        m = x.amax(dim=1, keepdim=True)
        x.sub_(m).exp_()
        s = x.sum(dim=1, keepdim=True)
        lse = (s.log() + m).squeeze(1)  # log-sum-exp
        loss = lse - target_logit
        if grad_scale is None:
            return loss, lse, None
        x.div_(s)  # softmax
        if z_loss:
            x.mul_((1.0 + 2.0 * z_loss * lse)[:, None])  # + d(z_loss * lse^2)/d logits = 2 z_loss lse softmax
        x[rows, targets] -= 1.0  # d loss_row / d logits = softmax - onehot(target)
        x.mul_(grad_scale[:, None])
        return loss, lse, x.to(logits.dtype)


EAGER = EagerChunkLoss()


class ZLoss:
    """The head's z-loss: its coefficient (`train.z_loss`, > 0) and the sum of the terms it added since `take()`.

    Each training call of the head adds its term, coef * mean(lse^2) over its targets, detached and on the device
    (no host read); the engine takes the step's sum once, for the `z_loss` metric, and reports the loss without it.
    """

    def __init__(self, coef: float):
        self.coef = coef
        self._total: torch.Tensor | None = None

    def add(self, term: torch.Tensor) -> None:
        self._total = term if self._total is None else self._total + term

    def take(self) -> torch.Tensor | None:
        """The sum of the terms added since the last take (None when none was)."""
        total, self._total = self._total, None
        return total


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int,
                chunk: int, chunk_loss: ChunkLoss, grad_hidden: bool, grad_weight: bool,
                z_loss: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean of cross-entropy + z_loss * lse^2, mean of z_loss * lse^2): the loss, and its z-loss term."""
        valid = targets != ignore_index
        n_valid = valid.sum().clamp(min=1)  # a device tensor: no host sync
        safe_targets = torch.where(valid, targets, 0)
        want_grad = grad_hidden or grad_weight
        scale = valid.float() / n_valid if want_grad else None  # d mean / d loss_row
        loss_sum = torch.zeros((), dtype=torch.float32, device=hidden.device)
        lse2_sum = torch.zeros((), dtype=torch.float32, device=hidden.device)
        dh = torch.empty(hidden.shape, dtype=hidden.dtype, device=hidden.device) if grad_hidden else None  # (N, D)
        dw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if grad_weight else None
        for start in range(0, hidden.shape[0], chunk):
            end = start + chunk
            h = hidden[start:end]  # (c, D)
            logits = h @ weight.t()  # (c, V_local) in the compute dtype
            rows, lse, grad = chunk_loss(logits, safe_targets[start:end], None if scale is None else scale[start:end],
                                         z_loss)
            loss_sum += torch.where(valid[start:end], rows, 0.0).sum()
            if z_loss:
                lse2_sum += torch.where(valid[start:end], lse * lse, 0.0).sum()
            if grad is not None:
                if dh is not None:
                    torch.mm(grad, weight, out=dh[start:end])  # (c, V) @ (V, D)
                if dw is not None:
                    _accumulate(dw, grad.t(), h)  # (V, c) @ (c, D), summed over chunks in fp32
            del logits, grad
        if dw is not None and weight.dtype != torch.float32:
            dw = dw.to(weight.dtype)  # rounded once, as one unchunked matmul would; half the bytes to backward
        ctx.save_for_backward(dh, dw)
        z_sum = z_loss * lse2_sum
        z_term = z_sum / n_valid
        ctx.mark_non_differentiable(z_term)  # a metric: its gradient is already part of the loss's
        return (loss_sum + z_sum if z_loss else loss_sum) / n_valid, z_term

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor, _grad_z_term: torch.Tensor | None):
        # In place: the saved gradients are ours alone (backward through this graph runs once).
        dh, dw = ctx.saved_tensors
        return (None if dh is None else dh.mul_(grad_loss), None if dw is None else dw.mul_(grad_loss),
                None, None, None, None, None, None, None)


def _accumulate(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc (fp32) += a @ b. For bf16/fp16 inputs on CUDA, cuBLAS accumulates in fp32 and adds into `acc` in the
    same call (addmm's out_dtype): no chunk's product is rounded to bf16 and no (V x D) temporary is made. Where
    that is not offered (CPU, an older torch), the chunk's product is made in the inputs' dtype and added in fp32:
    each chunk's dW rounded once before the sum."""
    if acc.dtype == a.dtype:
        acc.addmm_(a, b)
    elif acc.is_cuda and _fp32_addmm_on_cuda():
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    else:
        acc.add_(a @ b)


@functools.lru_cache(maxsize=1)
def _fp32_addmm_on_cuda() -> bool:
    """Whether this torch's CUDA addmm takes bf16 inputs into an fp32 output (tried once on a tiny product)."""
    try:
        acc = torch.ones(2, 2, device="cuda")  # 1 + 2: accumulated into acc, not written over it
        x = torch.ones(2, 2, device="cuda", dtype=torch.bfloat16)
        torch.addmm(acc, x, x, out_dtype=torch.float32, out=acc)
        return bool(acc.eq(3).all())
    except (RuntimeError, TypeError):
        return False


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_loss: ChunkLoss,
                         ignore_index: int = -100, chunk: int = 0, z_loss: ZLoss | None = None) -> torch.Tensor:
    """Mean over targets != ignore_index of cross_entropy(hidden @ weight.T, targets), never holding more than one
    chunk of logits. hidden (N, D), weight (V_local, D), targets (N,). `chunk`: tokens per chunk, 0 = sized by
    pretrain.model.loss_chunks. Under tensor parallelism `weight` is this rank's vocab slice and `chunk_loss`
    reduces across ranks; the caller all-reduces dh (megatron-core's copy-to-region) as for any column-parallel
    linear. `z_loss`: add z_loss.coef * lse^2 to every row (mean over the same targets) and record the term in it."""
    grad = torch.is_grad_enabled()
    c = chunk_tokens(hidden.shape[0], weight.shape[0], chunk_loss.bytes_per_logit(hidden.dtype), chunk)
    coef = z_loss.coef if z_loss is not None else 0.0
    loss, z_term = _LinearCrossEntropy.apply(hidden, weight, targets, ignore_index, c, chunk_loss,
                                             grad and hidden.requires_grad, grad and weight.requires_grad, coef)
    if coef:
        z_loss.add(z_term)
    return loss


@torch.no_grad()
def token_scores(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_loss: ChunkLoss,
                 vocab_start: int = 0, group: object | None = None, chunk: int = 0) -> torch.Tensor:
    """Per target: log p(target) and whether the target is the most likely token, chunk by chunk like the loss.

    What an evaluation harness asks of a model (lm-eval's `(logprob, is_greedy)`); the log-probability is minus
    the same loss row training computes (`chunk_loss`), so evaluation and training agree to the bit. hidden (N, D),
    weight (V_local, D), targets (N,) -> (N, 2) fp32: [log p, 1.0 if greedy else 0.0]. Under tensor parallelism
    `weight` is this rank's vocab slice starting at `vocab_start` and `group` the tensor-parallel group: the row
    maximum and the target's logit are all-reduced over it (the target lives on one rank's slice). Greedy compares
    the target's logit with the row maximum, so a tie counts as greedy, as `argmax == target` would for the first
    of equal logits."""
    out = torch.empty(hidden.shape[0], 2, dtype=torch.float32, device=hidden.device)
    c = chunk_tokens(hidden.shape[0], weight.shape[0], chunk_loss.bytes_per_logit(hidden.dtype), chunk)
    for start in range(0, hidden.shape[0], c):
        logits = hidden[start:start + c] @ weight.t()  # (c, V_local)
        t = targets[start:start + c] - vocab_start
        mine = (t >= 0) & (t < logits.shape[1])
        rows = torch.arange(logits.shape[0], device=logits.device)
        picked = torch.where(mine, logits[rows, t.clamp(0, logits.shape[1] - 1)].float(), 0.0)
        top = logits.amax(dim=1).float()
        if group is not None:
            torch.distributed.all_reduce(picked, group=group)
            torch.distributed.all_reduce(top, op=torch.distributed.ReduceOp.MAX, group=group)
        loss, _, _ = chunk_loss(logits, targets[start:start + c], None)  # may overwrite logits: read them first
        out[start:start + c, 0] = -loss
        out[start:start + c, 1] = (picked >= top).float()
    return out
