"""Run under torchrun (2 gloo ranks): the checkpoint commit protocol with a stand-in save callback.

Writes result_<rank>.json beside the run dir with what each rank observed; tests/train/test_checkpoint.py asserts on it.
"""
from __future__ import annotations

import json
import os
import random
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from pretrain.libraries import lighten_imports

lighten_imports()  # as `pretrain train` does, before DeepSpeed and megatron-core are imported
from pretrain import checkpoint as ckpt  # noqa: E402


class Gloo:
    def __init__(self) -> None:
        dist.init_process_group("gloo")
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()

    def barrier(self) -> None:
        dist.barrier()

    def all_reduce_max(self, value: float) -> float:
        t = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return float(t.item())


def model_saver(step: int):
    def save(d: Path) -> None:  # stands in for engine.save: every rank writes its own shard
        torch.save({"w": torch.full((4,), float(step))}, d / f"model_rank{dist.get_rank()}.pt")
    return save


def main(run_dir: Path) -> None:
    env = Gloo()
    out: dict = {"rank": env.rank}
    for step in (1, 2, 3):
        torch.manual_seed(100 + step)
        random.seed(step)
        ckpt.save(run_dir, step, env, save_model=model_saver(step), rank_state={"loader": {"cursor": step * 10 + env.rank}},
                  meta=ckpt.Meta(step=step, mlflow_run_id="abc"), config_yaml="x: 1\n", keep=2)
    # What a resumed run must draw next: remember it, scramble the RNG, then load.
    expected = (torch.rand(3).tolist(), random.random())
    torch.manual_seed(0); random.seed(0)
    chosen = ckpt.choose(run_dir, "auto", env)
    seen: list[Path] = []
    loaded = ckpt.load(chosen, env, load_model=seen.append)
    out.update(chosen=chosen.name, loaded_step=loaded.step, cursor=loaded.rank_state["loader"]["cursor"],
               rng_restored=[torch.rand(3).tolist(), random.random()] == list(expected),
               steps_on_disk=ckpt.list_steps(run_dir), load_called_with=[p.name for p in seen])
    env.barrier()
    # A save that died after engine state but before the manifest, and a corrupted newest checkpoint.
    if env.rank == 0:
        (run_dir / ".tmp_step_4").mkdir()
        (run_dir / ".tmp_step_4" / "model_rank0.pt").write_bytes(b"half")
        victim = run_dir / "step_3" / "model_rank1.pt"
        victim.write_bytes(victim.read_bytes()[:-5])
    env.barrier()
    out["fallback"] = ckpt.choose(run_dir, "auto", env).name
    try:
        ckpt.choose(run_dir, str(run_dir / "step_3"), env)
        out["explicit"] = "loaded"
    except ckpt.CheckpointError as e:
        out["explicit"] = str(e)
    # One file per rank: two ranks printing to torchrun's shared stdout can interleave.
    (run_dir.parent / f"result_{env.rank}.json").write_text(json.dumps(out))
    env.barrier()
    dist.destroy_process_group()
    # Everything is written: leave without interpreter teardown, where a gloo thread destroyed still joinable
    # aborted this stand-in now and then ("terminate called without an active exception", about 1 run in 3).
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
