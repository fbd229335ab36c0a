"""Gradient parity of megatron-core's tensor-parallel pieces against whole nn.Linear / the reference model.

Runs inside the parity worker's torchrun launch (2 ranks, TP=2) and returns the largest differences found.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from pretrain.config import load_config
from pretrain.run.layout import resolve_layout
from pretrain.run.distributed import init_distributed
from pretrain.model import Transformer, init_model
from pretrain.model.init import local_slice
from pretrain.parallel.tensor import TensorParallelFactory, model_parallel_config


def _diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest difference relative to the largest reference entry."""
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def single_layers(factory: TensorParallelFactory) -> dict[str, float]:
    """Column- and row-parallel linears vs one whole nn.Linear: outputs, weight grads, input grads."""
    g = torch.Generator().manual_seed(3)
    d_in, d_out = 32, 48
    w_full = torch.randn(d_out, d_in, generator=g)
    x = torch.randn(2, 5, d_in, generator=g)
    probe = torch.randn(2, 5, d_out, generator=g)  # loss = <y, probe>: every output element gets a gradient
    ref = torch.nn.Linear(d_in, d_out, bias=False)
    ref.weight.data.copy_(w_full)
    x_ref = x.clone().requires_grad_(True)
    y_ref = ref(x_ref)
    (y_ref * probe).sum().backward()
    out: dict[str, float] = {}
    rank, tp = factory.tp_rank, factory.tp

    col = factory.column_linear(d_in, d_out)
    col.weight.data.copy_(local_slice(w_full, col.weight, rank))
    x_col = x.clone().requires_grad_(True)
    y = col(x_col)  # (B, T, d_out/tp): this rank's output columns
    (y * probe.chunk(tp, dim=-1)[rank]).sum().backward()
    out["column_output"] = _diff(y, y_ref.chunk(tp, dim=-1)[rank])
    out["column_weight_grad"] = _diff(col.weight.grad, local_slice(ref.weight.grad, col.weight, rank))
    out["column_input_grad"] = _diff(x_col.grad, x_ref.grad)  # all-reduced over TP in backward

    row = factory.row_linear(d_in, d_out)
    row.weight.data.copy_(local_slice(w_full, row.weight, rank))
    x_row = x.chunk(tp, dim=-1)[rank].clone().requires_grad_(True)  # input arrives split (from a column layer)
    y = row(x_row)  # (B, T, d_out): partial products summed over TP
    (y * probe).sum().backward()
    out["row_output"] = _diff(y, y_ref)
    out["row_weight_grad"] = _diff(row.weight.grad, local_slice(ref.weight.grad, row.weight, rank))
    out["row_input_grad"] = _diff(x_row.grad, x_ref.grad.chunk(tp, dim=-1)[rank])
    return out


def whole_model() -> dict[str, float]:
    from parallel_common import VOCAB, case_config, global_batch

    cfg = load_config(None, case_config({"tp": 2}))
    env = init_distributed(cfg, layout=resolve_layout(cfg, dist.get_world_size(), VOCAB))
    args = cfg.model.args(VOCAB)
    factory = TensorParallelFactory(model_parallel_config(2, 1, False, torch.float32))
    out = single_layers(factory)
    tp_model, ref = Transformer(args, factory), Transformer(args)
    init_model(tp_model, args, cfg.train.seed, env.tp_rank)
    init_model(ref, args, cfg.train.seed)
    tokens = global_batch(0)
    loss_tp = tp_model(tokens[:, :-1], tokens[:, 1:])
    loss_ref = ref(tokens[:, :-1], tokens[:, 1:])
    loss_tp.backward()
    loss_ref.backward()
    out["model_loss"] = abs(float(loss_tp) - float(loss_ref)) / float(loss_ref)
    ref_params = dict(ref.named_parameters())
    worst_init = worst_grad = 0.0
    for name, p in tp_model.named_parameters():
        worst_init = max(worst_init, _diff(p, local_slice(ref_params[name].detach(), p, env.tp_rank)))
        worst_grad = max(worst_grad, _diff(p.grad, local_slice(ref_params[name].grad, p, env.tp_rank)))
    out["model_init"] = worst_init  # init does not depend on TP
    out["model_grad"] = worst_grad
    dist.barrier()
    return out
