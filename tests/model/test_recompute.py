"""Selective recompute (pretrain/model/recompute.py) re-runs no matmul and no attention in backward, and trains
exactly as without recompute; `full` re-runs every block's forward (the control that shows the count can move)."""
from __future__ import annotations

from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from pretrain.model import FLAVORS, REFERENCE, Transformer, init_model

aten = torch.ops.aten
MATMULS = (aten.mm.default, aten.addmm.default, aten.bmm.default)
ATTENTION = aten._scaled_dot_product_flash_attention_for_cpu.default


class _Ops(TorchDispatchMode):
    """How many times each op ran while active (ops that selective recompute answers from its cache never reach
    this mode: they do not run)."""

    def __init__(self):
        super().__init__()
        self.count: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count[func] += 1
        return func(*args, **(kwargs or {}))

    def matmuls(self) -> int:
        return sum(self.count[op] for op in MATMULS)


def _train_once(mode: str):
    args = FLAVORS["debug"].replace(vocab_size=256)
    model = Transformer(args, REFERENCE, mode)
    init_model(model, args, seed=2)
    tokens = torch.randint(0, 256, (2, 33), generator=torch.Generator().manual_seed(0))
    with _Ops() as forward:
        loss = model(tokens[:, :-1], tokens[:, 1:])
    with _Ops() as backward:
        loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    return loss.detach(), grads, forward, backward, args.n_layers


def test_selective_backward_runs_no_matmul_or_attention_that_forward_ran():
    loss_n, grads_n, fwd_n, bwd_n, layers = _train_once("none")
    loss_s, grads_s, fwd_s, bwd_s, _ = _train_once("selective")
    loss_f, _, _, bwd_f, _ = _train_once("full")
    assert bwd_s.matmuls() == bwd_n.matmuls()  # only the gradients' matmuls, as without recompute
    assert bwd_s.count[ATTENTION] == 0
    # full re-runs wq wk wv wo w1 w3 per block (torch's checkpoint stops once backward has every tensor it
    # needs: w2's output is not one of them)
    assert bwd_f.matmuls() == bwd_n.matmuls() + 6 * layers and bwd_f.count[ATTENTION] == layers
    assert fwd_s.matmuls() == fwd_n.matmuls()
    assert torch.equal(loss_s, loss_n) and torch.equal(loss_f, loss_n)
    for name, g in grads_s.items():
        torch.testing.assert_close(g, grads_n[name], rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("mode", ["selective", "full"])
def test_recompute_is_off_for_inference_and_cached_decoding(mode):
    """no_grad forward (eval, generate) runs each block once, whatever the recompute mode."""
    args = FLAVORS["debug"].replace(vocab_size=256)
    model = Transformer(args, REFERENCE, mode)
    init_model(model, args, seed=2)
    with torch.no_grad(), _Ops() as ops:
        model(torch.randint(0, 256, (1, 8)))
    assert ops.count[ATTENTION] == args.n_layers


def test_selective_keeps_the_fp8_scales_amax():
    """torchao's FP8 scales come from an amax of each tensor (tensorwise: aten.max) or each row (rowwise:
    aten.amax): both are kept, so backward re-runs no reduction over a whole activation to rebuild a scale."""
    from torch.utils.checkpoint import checkpoint

    from pretrain.model.recompute import selective_context

    g = torch.Generator().manual_seed(0)
    w = torch.randn(16, 16, generator=g, requires_grad=True)
    x = torch.randn(8, 16, generator=g, requires_grad=True)

    def scaled_matmul(x):
        rowwise = x.abs().amax(dim=1, keepdim=True)
        tensorwise = x.abs().max()
        return ((x / rowwise) @ w).relu() * tensorwise

    y = checkpoint(scaled_matmul, x, use_reentrant=False, context_fn=selective_context)
    with _Ops() as backward:
        y.square().sum().backward()
    assert backward.count[aten.amax.default] == 0 and backward.count[aten.max.default] == 0
    assert backward.count[aten.abs.default] > 0  # the control: the cheap elementwise op is recomputed


def test_selective_keeps_varlen_flash_attention_without_importing_it():
    """Document masking on CUDA runs torch's varlen flash attention (a custom op): kept like the other attention
    kernels, matched by name so that the policy module does not import it (it imports torch._dynamo)."""
    from torch.utils.checkpoint import CheckpointPolicy

    from pretrain.model.recompute import _policy

    import torch.nn.attention.varlen  # noqa: F401  (registers the op; CPU has it too)

    assert _policy(None, torch.ops.torch_attn._varlen_attn.default) == CheckpointPolicy.MUST_SAVE
    assert _policy(None, aten.mm.default) == CheckpointPolicy.MUST_SAVE
    assert _policy(None, aten.add.Tensor) == CheckpointPolicy.PREFER_RECOMPUTE
