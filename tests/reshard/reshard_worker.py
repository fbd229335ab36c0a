"""Runs inside torchrun (gloo, CPU), or as one plain process for one rank: writes committed checkpoints of some
layouts, and resumes them on others.

    reshard_worker.py OUT MODE CASES_JSON [MODE CASES_JSON ...]

Jobs run in order in one launch (several cases each: importing DeepSpeed + megatron-core dominates the cost):
  write  CASES_JSON   for each case: train STEPS_A steps on its layout, commit OUT/<name>/step_<STEPS_A>, and
                      dump the live engine's oracle for the reader test (OUT/<name>.oracle.pt, rank 0)
  resume CASES_JSON   for each case: train STEPS_B straight on the target layout, then resume OUT/<source>/step_6
                      on it (re-sliced) and train to STEPS_B; optionally again with Adam's moments reset
Results go to OUT/results_<mode>_<world>.json (rank 0), one file per job.
"""
from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "parallel"))
from parallel_common import batches_for, case_config  # noqa: E402

from pretrain.libraries import lighten_imports  # noqa: E402

lighten_imports()  # as `pretrain train` does, before DeepSpeed and megatron-core are imported
from pretrain import checkpoint  # noqa: E402
from pretrain.config import load_config  # noqa: E402
from pretrain.run.distributed import init_distributed  # noqa: E402
from pretrain.train.engine import build_engine  # noqa: E402
from pretrain.run.resolved import resolve_run  # noqa: E402

STEPS_A = 6   # steps on the source layout before the checkpoint
STEPS_B = 12  # the target layout trains to this step, straight and resumed
WORLD = int(os.environ.get("WORLD_SIZE", 1))


def _setup(case: dict, out: Path):
    cfg = load_config(None, case_config({**case, "world": WORLD}) + [f"train.max_steps={STEPS_B}",
                                                                     f"checkpoint.dir={out / case['name']}"])
    run = resolve_run(cfg, WORLD, require_data=False)  # the synthetic batches of parallel_common, no shards
    env = init_distributed(cfg, layout=run.layout)
    return cfg, run, env


def live_state(engine) -> dict[str, dict[str, torch.Tensor]] | None:
    """The oracle: the engine's own full fp32 master weight and Adam moments per reference name, through
    DeepSpeed's public accessors (safe_get_full_*), on rank 0. Layouts without TP/PP only (names are reference
    names, no TP concat needed)."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    out: dict[str, dict[str, torch.Tensor]] = {}
    zero = engine.cfg.parallel.zero_stage
    opt = engine.ds.optimizer
    if hasattr(opt, "bit16_groups"):
        # DeepSpeed 0.19's ZeRO-1/2 links parameters to their moments right after stepping the FIRST param group,
        # when the other groups have no state yet, and never again: safe_get_full_optimizer_state then fails for
        # every parameter of group 2 (the norm weights). Link them as DeepSpeed means to.
        from deepspeed.utils.mixed_precision_linkage import lazy_init_hp_params_optimizer_state

        for lps, flat in zip(opt.bit16_groups, opt.single_partition_of_fp32_groups):
            lazy_init_hp_params_optimizer_state(lps, flat, opt.optimizer.state)
    for name, p in engine.ds.module.named_parameters():
        if zero == 0:
            state = engine.ds.optimizer.state[p]
            got = {"param": p.detach(), "exp_avg": state["exp_avg"], "exp_avg_sq": state["exp_avg_sq"]}
        else:  # collective (all-reduce over DP)
            got = {"param": safe_get_full_fp32_param(p), "exp_avg": safe_get_full_optimizer_state(p, "exp_avg"),
                   "exp_avg_sq": safe_get_full_optimizer_state(p, "exp_avg_sq")}
        out[name] = {k: v.detach().float().cpu().clone() for k, v in got.items()}
    return out if dist.get_rank() == 0 else None


def write(case: dict, out: Path) -> dict:
    cfg, run, env = _setup(case, out)
    engine = build_engine(cfg, env, run)
    data = batches_for(env.dp_rank, env.layout, STEPS_B)
    losses = _train(engine, data, STEPS_A)
    meta = checkpoint.Meta(step=STEPS_A, layout=vars(env.layout).copy(), resolved=run.to_dict())
    checkpoint.save(cfg.checkpoint.dir, STEPS_A, env, save_model=engine.save, rank_state={}, meta=meta,
                    config_yaml=cfg.to_yaml(), keep=1)
    oracle = {"reference": engine.reference_state_dict()}
    if env.layout.tp == 1 and env.layout.pp == 1:
        oracle["live"] = live_state(engine)
    if env.rank == 0:
        torch.save(oracle, out / f"{case['name']}.oracle.pt")
    return {"losses": losses}


def _train(engine, data, steps: int) -> list[float]:
    return [engine.train_step(data).loss for _ in range(steps)]


def reset_moments(engine) -> None:
    """The negative control: Adam's moments forgotten (weights and step kept), as a weights-only resume would."""
    base = engine.ds.optimizer if engine.cfg.parallel.zero_stage == 0 else engine.ds.optimizer.optimizer
    for state in base.state.values():
        for key in ("exp_avg", "exp_avg_sq"):
            state[key].zero_()


_straight: dict[str, list[float]] = {}


def resume(case: dict, out: Path) -> dict:
    """Target layout B: STEPS_B straight steps from the seeded init, and the source's step 6 re-sliced onto B then
    trained to STEPS_B on the same global batches."""
    from pretrain.checkpoint.reader import CheckpointReader

    target = case["target"]
    key = json.dumps(target, sort_keys=True)
    cfg, run, env = _setup({"name": case["name"], **target}, out)
    if key not in _straight:
        engine = build_engine(cfg, env, run)
        _straight[key] = _train(engine, batches_for(env.dp_rank, env.layout, STEPS_B), STEPS_B)
    reader = CheckpointReader(out / case["source"] / f"step_{STEPS_A}")
    engine = build_engine(cfg, env, run, init=reader)
    engine.load_resliced(reader)
    exact = None
    if env.layout.tp == 1 and env.layout.pp == 1:  # the loaded state itself, through DeepSpeed's getters
        live = live_state(engine)
        if live is not None:
            # Vocabulary matrices: the rows both paddings have (the rest are cut, or new and seeded).
            exact = all(torch.equal(v[: len(reader.tensor(n, k))], reader.tensor(n, k)[: len(v)])
                        for n in live for k, v in live[n].items())
    if case.get("reset_moments"):
        reset_moments(engine)
    data = batches_for(env.dp_rank, env.layout, STEPS_B)
    for _ in range(STEPS_A * env.layout.grad_accum):  # the global batches of steps 1..6 were the source's
        next(data)
    return {"straight": _straight[key], "resumed": _train(engine, data, STEPS_B - STEPS_A),
            "global_step_after": engine.global_step, "state_exact": exact}


def run_job(mode: str, cases: list[dict], out: Path) -> None:
    """Every case of one job, each on its own fresh process groups; results on rank 0."""
    from megatron.core import parallel_state

    results = {}
    for case in cases:
        try:
            results[case["name"]] = {"write": write, "resume": resume}[mode](case, out)
        except Exception:  # the other ranks may wait in a collective forever: end the launch, loudly
            print(f"{mode} case {case['name']} failed:\n{traceback.format_exc()}", file=sys.stderr, flush=True)
            os._exit(1)
        parallel_state.destroy_model_parallel()
        dist.barrier()
    if dist.get_rank() == 0:
        (out / f"results_{mode}_{WORLD}.json").write_text(json.dumps(results, indent=1))


def main() -> None:
    out, jobs = Path(sys.argv[1]), sys.argv[2:]
    assert jobs and len(jobs) % 2 == 0, "usage: reshard_worker.py OUT MODE CASES_JSON [MODE CASES_JSON ...]"
    for mode, cases in zip(jobs[::2], jobs[1::2]):
        run_job(mode, json.loads(Path(cases).read_text()), out)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
