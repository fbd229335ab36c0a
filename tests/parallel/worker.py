"""Runs inside torchrun (2 ranks, gloo): trains every requested layout on the same init and data, and reports.

Launched once by the parity test for a whole table of layouts, because importing DeepSpeed + megatron-core costs
more than training the tiny model. Each case re-creates megatron-core's groups for its (tp, pp).
Usage: python -m torch.distributed.run --nproc-per-node 2 tests/parallel/worker.py CASES_JSON OUT_DIR
"""
from __future__ import annotations

import json
import math
import os
import sys
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

from pretrain.libraries import lighten_imports

lighten_imports()  # as `pretrain train` does, before DeepSpeed and megatron-core are imported
from pretrain.config import load_config  # noqa: E402
from pretrain.run.distributed import init_distributed  # noqa: E402
from pretrain.train.engine import build_engine  # noqa: E402
from pretrain.run.resolved import resolve_run  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from parallel_common import STEPS, VOCAB, batches_for, case_config, global_batch  # noqa: E402


def run_case(case: dict, out: Path) -> dict:
    from megatron.core import parallel_state

    cfg = load_config(None, case_config(case))
    # The batches come from parallel_common, not from shards: the run is resolved without data.
    run = resolve_run(cfg, int(os.environ["WORLD_SIZE"]), require_data=False, vocab_without_data=VOCAB)
    env = init_distributed(cfg, layout=run.layout)
    result: dict = {"losses": [], "grad_norms": [], "lrs": [], "z_losses": []}
    try:
        engine = build_engine(cfg, env, run)
        data = batches_for(env.dp_rank, env.layout, STEPS + 3, cfg.model.document_mask)
        for _ in range(STEPS):
            r = engine.train_step(data)
            result["losses"].append(r.loss)
            result["grad_norms"].append(r.grad_norm)
            result["lrs"].append(r.lr)
            result["z_losses"].append(r.z_loss)
        # evaluation's question of the trained weights (validation and lm-eval ask it): whole rows on every rank
        tokens = global_batch(STEPS)[:2]
        scores = engine.score(tokens[:, :-1], tokens[:, 1:])
        result["score_logp_sum"], result["score_argmax"] = float(scores[..., 0].sum()), int(scores[..., 1].sum())
        sd = engine.reference_state_dict()
        if env.rank == 0:
            torch.save(sd, out / f"{case['name']}.weights.pt")
        ckpt = out / f"ckpt_{case['name']}"
        engine.save(ckpt)
        dist.barrier()
        result["after_save_loss"] = engine.train_step(data).loss  # step STEPS+1 of the uninterrupted run

        fresh = build_engine(cfg, env, run)
        try:
            fresh.load(out / "no_such_step")
        except Exception as e:  # must be a one-line refusal, never a silent start from random weights
            result["missing_load_error"] = f"{type(e).__name__}: {e}"
        if "refuse" in case:  # a checkpoint written by another layout earlier in this launch
            try:
                fresh.load(out / f"ckpt_{case['refuse']}")
                result["foreign_load_error"] = "loaded a checkpoint of another layout"
            except Exception as e:
                result["foreign_load_error"] = f"{type(e).__name__}: {e}"
        fresh.load(ckpt)
        # Every rank must resume at the same step (DeepSpeed writes client_state from DP rank 0 only).
        steps = (env.all_reduce_max(fresh.global_step), -env.all_reduce_max(-fresh.global_step))
        result["loaded_global_step"] = steps[0] if steps[0] == steps[1] else f"ranks disagree: {steps}"
        replay = batches_for(env.dp_rank, env.layout, STEPS + 3, cfg.model.document_mask)
        for _ in range(STEPS * env.layout.grad_accum):
            next(replay)
        result["after_load_loss"] = fresh.train_step(replay).loss

        before = fresh.reference_state_dict()
        fresh.inject_nonfinite()
        bad = fresh.train_step(replay)
        after = fresh.reference_state_dict()
        result["nan_skipped"] = bad.skipped
        result["nan_loss_finite"] = math.isfinite(bad.loss)
        if env.rank == 0:
            result["nan_weights_unchanged"] = all(torch.equal(before[k], after[k]) for k in before)
        result["after_nan_loss_finite"] = math.isfinite(fresh.train_step(replay).loss)
        result["eval_loss"] = fresh.eval_step(batches_for(env.dp_rank, env.layout, 1, cfg.model.document_mask))
    finally:
        parallel_state.destroy_model_parallel()
    return result


def main() -> None:
    cases = json.loads(Path(sys.argv[1]).read_text())
    out = Path(sys.argv[2])
    results = {}
    for case in cases:
        try:
            if case.get("kind") == "tp_grads":
                from megatron.core import parallel_state
                from tp_grads import whole_model

                results[case["name"]] = whole_model()
                parallel_state.destroy_model_parallel()
            else:
                results[case["name"]] = run_case(case, out)
        except Exception:  # report and go on: one broken layout should not hide the others
            results[case["name"]] = {"error": traceback.format_exc()[-3000:]}
            print(results[case["name"]]["error"], file=sys.stderr, flush=True)
        dist.barrier()
    if dist.get_rank() == 0:
        (out / "results.json").write_text(json.dumps(results, indent=1))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
