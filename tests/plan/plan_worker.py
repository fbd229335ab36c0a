"""Runs inside torchrun (2 ranks, gloo): measures what the planner predicts, and writes one JSON per rank.

- "tp2": saved-activation bytes of one block (megatron-core TP layers, SP off) per recompute mode and dtype;
- "pp2": the peak of saved-activation bytes during a real DeepSpeed pipeline step (2 stages, 4 micro-batches);
- "zero": model-state tensor bytes (weights, gradients, optimizer) DeepSpeed holds per rank, ZeRO-0..3 at dp=2,
  and ZeRO-2/3 at cp=2 (dp=1: partitioned over dp x cp);
- "cp2": saved-activation bytes of one block behind context parallelism's all-to-all (T/cp tokens per rank), per
  kv-head count (split, or repeated first), qk_norm, recompute mode and dtype; and the peak during a real DeepSpeed
  step of the whole model at cp=2 (the loss head on T/cp tokens too).
One launch for all, because importing DeepSpeed + megatron-core costs more than the measurements.
Usage: python -m torch.distributed.run --nproc-per-node 2 tests/plan/plan_worker.py OUT_DIR
"""
from __future__ import annotations

import gc
import json
import os
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from plan_common import (BATCH, CP_BLOCKS, SEQ, VOCAB, block_args, case_overrides, cp_block_args,  # noqa: E402
                         micro_batches)
from saved_bytes import SavedBytes  # noqa: E402

from pretrain.libraries import lighten_imports  # noqa: E402

lighten_imports()  # as `pretrain train` does, before DeepSpeed and megatron-core are imported
from pretrain.config import load_config  # noqa: E402
from pretrain.run.distributed import init_distributed  # noqa: E402
from pretrain.model.transformer import TransformerBlock, _rope_table  # noqa: E402
from pretrain.plan.describe import planned_run  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def persistent(args) -> list[torch.Tensor]:
    return list(_rope_table(args.head_dim, args.max_seq_len, args.rope_theta, "cpu"))


def reset(env) -> None:
    from megatron.core import parallel_state

    env.barrier()
    parallel_state.destroy_model_parallel()


def tp2() -> dict:
    from pretrain.parallel.tensor import TensorParallelFactory, model_parallel_config

    cfg = load_config(None, case_overrides(tp=2))
    env = init_distributed(cfg, layout=planned_run(cfg, int(os.environ["WORLD_SIZE"]), VOCAB).layout)
    args = block_args()
    out = {}
    for dtype in DTYPES:
        factory = TensorParallelFactory(model_parallel_config(2, 1, False, torch.float32))
        for mode in ("none", "selective", "full"):
            torch.manual_seed(0)
            block = TransformerBlock(args, factory, 0, mode).to(DTYPES[dtype])
            with torch.no_grad():
                for p in block.parameters():
                    p.normal_(0, 0.02)
            x = torch.randn(BATCH, SEQ, args.dim, dtype=DTYPES[dtype], requires_grad=True)
            with SavedBytes(exclude=[*block.parameters(), *persistent(args)]) as m:
                y = block(x)
            out[f"{dtype}_{mode}"] = m.now
            y.float().sum().backward()  # the TP collectives of the backward run too: the block is real
    reset(env)
    return out


def engine_step_peak(**overrides) -> int:
    """The peak of saved bytes over one real engine step of the tiny model on this launch's ranks."""
    from pretrain.train.engine import build_engine

    cfg = load_config(None, case_overrides(**overrides))
    run = planned_run(cfg, int(os.environ["WORLD_SIZE"]), VOCAB)
    env = init_distributed(cfg, layout=run.layout)
    engine = build_engine(cfg, env, run)
    with SavedBytes(exclude=[*engine.ds.module.parameters(), *persistent(engine.args)]) as m:
        engine.train_step(micro_batches(cfg.train.grad_accum))
    del engine
    gc.collect()
    reset(env)
    return m.peak


def pp2() -> dict:
    return {f"{dtype}_{mode}": engine_step_peak(pp=2, zero=zero, dtype=dtype, mode=mode)
            for dtype, zero in (("fp32", 0), ("bf16", 1)) for mode in ("none", "selective", "full")}


def cp2() -> dict:
    """Each of 2 CP ranks: one block's saved bytes for its T/2 tokens (reference layers, attention behind the
    all-to-all), then whole-model steps of the engine at cp=2 (fp32, ZeRO-0): the peak of saved bytes."""
    from megatron.core import parallel_state

    from pretrain.model.layers import REFERENCE
    from pretrain.parallel.context import apply_context_parallel
    from pretrain.run.layout import kv_replicas

    cfg = load_config(None, case_overrides(cp=2))
    env = init_distributed(cfg, layout=planned_run(cfg, int(os.environ["WORLD_SIZE"]), VOCAB).layout)
    group = parallel_state.get_context_parallel_group()
    out = {}
    for kv, qk_norm in CP_BLOCKS:
        args = cp_block_args(kv, qk_norm)
        for dtype in DTYPES:
            for mode in ("none", "selective", "full"):
                torch.manual_seed(0)
                block = TransformerBlock(args, REFERENCE, 0, mode).to(DTYPES[dtype])
                apply_context_parallel(block, group, kv_replicas(args.n_heads, args.kv_heads, 2))
                x = torch.randn(BATCH, SEQ // 2, args.dim, dtype=DTYPES[dtype], requires_grad=True)
                with SavedBytes(exclude=[*block.parameters(), *persistent(args)]) as m:
                    y = block(x)
                out[f"kv{kv}{'_qk_norm' if qk_norm else ''}_{dtype}_{mode}"] = m.now
                y.float().sum().backward()  # the all-to-alls of the backward run too
    reset(env)
    for mode in ("none", "selective", "full"):
        out[f"engine_{mode}"] = engine_step_peak(cp=2, mode=mode)
    return out


def _tensors(obj, seen: set[int], found: dict[int, int], depth: int = 0) -> None:
    """Every tensor reachable from obj through attributes, lists, tuples and dicts (and each parameter's .grad
    and ZeRO-3 partition `ds_tensor`), by storage: {storage pointer: bytes}."""
    if id(obj) in seen or depth > 6:
        return
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        for t in (obj, obj.grad if obj.is_leaf else None, getattr(obj, "ds_tensor", None)):
            if isinstance(t, torch.Tensor) and t.untyped_storage().nbytes():
                found[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return
    if isinstance(obj, (list, tuple, set)):
        items = obj
    elif isinstance(obj, dict):
        items = list(obj.values())
    elif hasattr(obj, "__dict__") and type(obj).__module__.split(".")[0] in ("deepspeed", "torch", "pretrain"):
        items = list(vars(obj).values())
        if isinstance(obj, nn.Module):
            items += list(obj.parameters()) + list(obj.buffers())
        if isinstance(obj, torch.optim.Optimizer):
            items += [obj.state, obj.param_groups]
    else:
        return
    for item in items:
        _tensors(item, seen, found, depth + 1)


def zero() -> dict:
    """Model states at their peak: when the second step's backward is done and DeepSpeed's step begins (gradients
    accumulated and reduced, Adam's moments allocated by the first step). The ZeRO-3 reduce bucket on its own."""
    from pretrain.train.engine import build_engine

    out = {}
    for stage, dtype, cp in ((0, "fp32", 1), (1, "bf16", 1), (2, "bf16", 1), (3, "bf16", 1), (2, "bf16", 2),
                             (3, "bf16", 2)):
        cfg = load_config(None, case_overrides(zero=stage, dtype=dtype, cp=cp))
        run = planned_run(cfg, int(os.environ["WORLD_SIZE"]), VOCAB)
        env = init_distributed(cfg, layout=run.layout)
        engine = build_engine(cfg, env, run)
        engine.train_step(micro_batches(1))
        ds_opt = engine.ds.optimizer
        seen: dict[str, int] = {}
        deepspeed_step = engine.ds.step

        def measure(*args, **kwargs):
            found: dict[int, int] = {}
            _tensors(engine.ds, set(), found)
            _tensors(ds_opt, set(), found)
            bucket_found: dict[int, int] = {}
            for b in getattr(ds_opt, "ipg_buckets", {}).values():
                _tensors(getattr(b, "buffer", None), set(), bucket_found)
            buckets = set(bucket_found)
            seen["bucket"] = sum(n for ptr, n in found.items() if ptr in buckets)
            seen["states"] = sum(found.values()) - seen["bucket"]
            return deepspeed_step(*args, **kwargs)

        engine.ds.step = measure  # instrumentation: measure, then DeepSpeed's own step
        engine.train_step(micro_batches(1))
        out[f"zero{stage}_{dtype}{'_cp2' if cp > 1 else ''}"] = seen
        del engine, ds_opt, deepspeed_step, measure
        gc.collect()
        reset(env)
    return out


def main() -> None:
    out_dir = Path(sys.argv[1])
    rank = int(os.environ["RANK"])
    result = {"tp2": tp2(), "pp2": pp2(), "zero": zero(), "cp2": cp2()}
    (out_dir / f"rank{rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
