"""Resume a checkpoint written with another layout (tp / pp / dp / ZeRO stage / dtype): re-slice, then load.

Why not DeepSpeed's Universal Checkpointing load path (`checkpoint.load_universal`: DeepSpeed 0.19's universal
loader and its ZeRO optimizers' `_load_universal_checkpoint`):
- it finds each parameter's folder by the *target* engine's own parameter name; a PipelineModule names a block
  "3.attention.wq.weight" and the plain model "layers.2.attention.wq.weight", so PP <-> no-PP never matches;
- it lives inside the ZeRO optimizers only: ZeRO-0 (fp32, our GuardedAdamW) has no universal load at all;
- `ds_to_universal` needs megatron's `universal_checkpoint_info` (which patterns are row/column/vocab parallel)
  inside the checkpoint, which our engine does not write.
So this module is the smallest own re-slicer over reference names, in two halves:
- weights: `build_engine(init=CheckpointReader(step_dir))` builds the new layout's module from the checkpoint's
  fp32 master weights (each rank copies its TP slice of every whole tensor, like the seeded init; vocabulary rows
  cut or completed with seeded rows, since padding is 128 x tp and padded rows are never targets) and, under
  bf16, writes the exact fp32 masters with DeepSpeed's `safe_set_full_fp32_param`;
- optimizer (`load_resliced` here): Adam's moments, whole from the reader, fitted to the new vocabulary padding
  (zeros for new rows), cut to this rank's TP piece (`local_slice`) and written through DeepSpeed's
  `safe_set_full_optimizer_state` into whatever ZeRO partition this rank owns; and Adam's step.
`pretrain convert-checkpoint --to universal` still writes DeepSpeed's universal format for other tools.

Memory per rank: one full parameter at a time (plus its TP piece), never the whole model.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from pretrain.checkpoint import CheckpointError
from pretrain.checkpoint.reader import CheckpointReader
from pretrain.checkpoint.weights import shape_differences
from pretrain.model.args import ModelArgs
from pretrain.model.init import VOCAB_ROWS, local_slice, reference_shapes
from pretrain.run.resolved import ResolvedRun

MOMENTS = ("exp_avg", "exp_avg_sq")


def needs_reslicing(saved: ResolvedRun, now: ResolvedRun) -> bool:
    """DeepSpeed's own load needs the very same files: same tp, pp, dp, cp (ZeRO partitions are over dp x cp),
    ZeRO stage, dtype and padded vocabulary."""
    a, b = saved.layout, now.layout
    return ((a.tp, a.pp, a.dp, a.cp, a.padded_vocab_size, saved.zero_stage, saved.dtype)
            != (b.tp, b.pp, b.dp, b.cp, b.padded_vocab_size, now.zero_stage, now.dtype))


def check_same_model(saved: ModelArgs, now: ModelArgs, where: Path) -> None:
    """Only the layout may change: the same network (the vocabulary padding and max_seq_len aside)."""

    diff = [f"{k} {getattr(saved, k)} -> {getattr(now, k)}" for k in shape_differences(saved, now)]
    if diff:
        raise CheckpointError(f"checkpoint {where} holds another model ({', '.join(diff)}); only the parallel "
                              "layout can change on resume")


def fit_rows(full: torch.Tensor, rows: int) -> torch.Tensor:
    """A moment of a vocabulary matrix for the new padding: cut, or completed with zeros (rows never trained)."""
    if full.shape[0] >= rows:
        return full[:rows]
    return torch.cat([full, full.new_zeros((rows - full.shape[0], *full.shape[1:]))])


@torch.no_grad()
def load_resliced(ds_engine, reader: CheckpointReader, args: ModelArgs, tp_rank: int,
                  rename: Callable[[str], str]) -> int:
    """Put the checkpoint's Adam moments and step into a DeepSpeed engine of another layout that was built from the
    same checkpoint (`build_engine(init=reader)`: the module copy and the fp32 master weights, exact under bf16
    too, with seeded rows where the new vocabulary padding adds some). Returns Adam's step count. Collective:
    every rank calls it."""
    from deepspeed.utils import safe_set_full_optimizer_state

    shapes = reference_shapes(args)
    zero = int(ds_engine.zero_optimization_stage())
    base = ds_engine.optimizer if zero == 0 else ds_engine.optimizer.optimizer  # the torch AdamW that steps
    step = reader.optimizer_step()
    # What AdamW steps: the module's parameters (ZeRO-0), the flat fp32 partitions (ZeRO-1/2, bf16), or ZeRO-3's
    # flat sub-group partitions (stage 3 empties the optimizer's param_groups between steps).
    flats = getattr(ds_engine.optimizer, "fp32_partitioned_groups_flat", None)
    _materialise_adam_state(base, flats or [p for g in base.param_groups for p in g["params"]], step)
    for name, param in ds_engine.module.named_parameters():
        ref = rename(name)
        moments = {key: reader.tensor(ref, key) for key in MOMENTS}
        if ref in VOCAB_ROWS:
            moments = {key: fit_rows(value, shapes[ref][0]) for key, value in moments.items()}
        moments = {key: local_slice(value, param, tp_rank) for key, value in moments.items()}
        if zero == 0:  # the optimizer holds the module's own parameters
            for key in MOMENTS:
                base.state[param][key].copy_(moments[key])
            continue
        mapping = getattr(param, "_hp_mapping", None)
        if zero in (1, 2) and mapping is not None:
            # ZeRO-1/2 and the bf16 optimizer link a parameter to its fragment of the moments only after their
            # first step (and DeepSpeed 0.19 links only the first param group then); link it to the state made
            # above so the setter finds it. The optimizer's own later link finds the same tensors.
            flat = base.param_groups[mapping.param_group_index]["params"][0]
            mapping.set_optim_state_fragment(flat, base.state[flat])
        if zero == 3 or mapping is not None:
            for key in MOMENTS:
                safe_set_full_optimizer_state(param, moments[key], key)
    if dist.is_initialized():
        dist.barrier()
    return step


def _materialise_adam_state(base: torch.optim.Optimizer, params: list[torch.Tensor], step: int) -> None:
    """torch's AdamW creates its state at the first step; the moments are written into it before that, so create
    it here (zeros), with Adam's step count (its bias correction) set to the checkpoint's."""
    on_device = bool(base.defaults.get("fused") or base.defaults.get("capturable"))  # as torch's AdamW keeps it
    for p in params:
        state = base.state[p]
        for key in MOMENTS:
            if key not in state:
                state[key] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["step"] = torch.tensor(float(step), dtype=torch.float32, device=p.device if on_device else "cpu")
