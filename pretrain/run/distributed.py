"""Process groups for a run: torch.distributed, megatron-core's TP x CP x DP x PP groups, and DeepSpeed's comm layer.

Works under torchrun (RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT) and as a plain single process
(it then makes a one-rank group on a free local port, so the same code path runs everywhere). Backend `auto`:
NCCL on CUDA, gloo on CPU.
"""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from pretrain.config import Config, ConfigError
from pretrain.console import library_stdout
from pretrain.parallel.fp8 import check_fp8
from pretrain.run.layout import Layout


@dataclass
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str
    layout: Layout
    tp_rank: int
    pp_rank: int
    dp_rank: int
    collective_timeout: timedelta
    cp_rank: int = 0  # this rank's slice of each sequence under context parallelism (parallel.cp)
    side: SideCollective | None = None  # for background work (checkpoint commits) while training runs

    @property
    def dp_size(self) -> int:
        return self.layout.dp

    def barrier(self) -> None:
        dist.barrier()

    def _all_reduce(self, value: float | torch.Tensor, op: dist.ReduceOp) -> float:
        """A number, or a one-element tensor on any device (read to the host once, after the reduction on NCCL)."""
        if isinstance(value, torch.Tensor):
            t = value.detach().reshape(1).to(device=self.comm_device, dtype=torch.float64)
        else:
            t = torch.tensor([float(value)], dtype=torch.float64, device=self.comm_device)
        dist.all_reduce(t, op=op)
        return float(t.item())

    @property
    def comm_device(self) -> torch.device:
        """Where a tensor for a collective lives: the GPU on NCCL, host memory on gloo."""
        return self.device if self.backend == "nccl" else torch.device("cpu")

    def all_reduce_max(self, value: float | torch.Tensor) -> float:
        return self._all_reduce(value, dist.ReduceOp.MAX)

    def all_reduce_sum(self, value: float | torch.Tensor) -> float:
        return self._all_reduce(value, dist.ReduceOp.SUM)

    def sums_of(self, values: torch.Tensor) -> list[float]:
        """Collective: each element of a 1-D tensor on any device summed over all ranks; one all-reduce (fp64) and
        one host read, as `all_reduce_sum` for a one-element tensor."""
        t = values.detach().reshape(-1).to(device=self.comm_device, dtype=torch.float64)
        dist.all_reduce(t)
        return t.tolist()

    def any_of(self, *flags: bool) -> tuple[bool, ...]:
        """Collective: each flag, True on every rank when it is True on any; one all-reduce for all of them (the
        loop's per-step agreement on a stop and on a spike costs what the stop alone did)."""
        t = torch.tensor([float(f) for f in flags], dtype=torch.float64, device=self.comm_device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return tuple(v > 0 for v in t.tolist())

    def apply_collective_timeout(self) -> None:
        """Give every process group this rank is in the run's timeout, including the ones created after
        `init_distributed`.

        Why: DeepSpeed makes its own groups (PipelineModule's grid, its tensor/data groups) with
        `torch.distributed.new_group(ranks)` and no timeout, so torch's 30-minute default applies to them, not the
        default group's. `_set_pg_timeout` is the function megatron-core's `update_pg_timeout` uses for the same
        job (that helper itself only walks megatron-core's groups and calls torch.cuda.synchronize). Call it once
        the engine is built; it is local (no collective).
        """
        from torch.distributed.distributed_c10d import _set_pg_timeout, _world

        for group in list(_world.pg_map):
            _set_pg_timeout(self.collective_timeout, group)

    def destroy(self) -> None:
        from megatron.core import parallel_state

        parallel_state.destroy_model_parallel()
        if dist.is_initialized():
            dist.destroy_process_group()


class SideCollective:
    """Collectives on a gloo group of all ranks kept apart from training's: a background checkpoint commit agrees
    and barriers here while the training thread runs its own collectives on the default group (two threads on
    one group would interleave their collectives differently on different ranks)."""

    def __init__(self, group: Any, rank: int, world_size: int):
        self.group, self.rank, self.world_size = group, rank, world_size

    def barrier(self) -> None:
        dist.barrier(group=self.group)

    def all_reduce_max(self, value: float) -> float:
        t = torch.tensor([float(value)], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        return float(t.item())


# What gloo raises when a peer is gone: its sockets closed (a killed process) or silent past the timeout (a lost node,
# a stopped or hung process). NCCL with TORCH_NCCL_ASYNC_ERROR_HANDLING tears the process down itself instead.
_LOST_PEER_MESSAGES = ("Timed out waiting", "Connection closed by peer", "Connection reset by peer")


def lost_peer(error: BaseException) -> bool:
    """True when `error` is a collective failing because another rank died or stopped answering."""
    return isinstance(error, RuntimeError) and any(m in str(error) for m in _LOST_PEER_MESSAGES)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pick_device(cfg: Config, local_rank: int) -> torch.device:
    want = cfg.train.device
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    if want == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("train.device=cuda but CUDA is not available; use train.device=auto or cpu")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def init_distributed(cfg: Config, *, layout: Layout) -> DistEnv:
    """Create every process group the run needs for the resolved run's layout (`pretrain.run.resolved.resolve_run`,
    which checked every rule that needs no process group; here only what needs the machine)."""
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if layout.world != world:
        raise ConfigError(f"the run was resolved for world size {layout.world} but WORLD_SIZE is {world}")
    device = _pick_device(cfg, local_rank)
    backend = cfg.train.backend
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl" and device.type != "cuda":
        raise ConfigError("train.backend=nccl needs train.device=cuda; use backend auto or gloo on CPU")
    if cfg.parallel.sequence_parallel and device.type != "cuda":
        raise ConfigError("parallel.sequence_parallel needs CUDA (megatron-core's sequence-parallel path calls "
                          "torch.cuda); set it to false on CPU")
    check_fp8(cfg.train.fp8, device)

    # One timeout for every collective (launch/plan.py relies on it: a dead peer fails the run instead of hanging it).
    timeout = timedelta(seconds=cfg.train.collective_timeout_s)
    if backend == "nccl":  # torch's NCCL flight recorder: the hang watchdog dumps it (pretrain/train/watchdog.py)
        os.environ.setdefault("TORCH_NCCL_TRACE_BUFFER_SIZE", "2000")
    if not dist.is_initialized():
        if world == 1 and "MASTER_ADDR" not in os.environ:
            os.environ["MASTER_ADDR"] = "127.0.0.1"
            os.environ["MASTER_PORT"] = str(_free_port())
        # DeepSpeed asserts these exist (torchrun sets them); a plain single process gets torchrun's values.
        for key, value in (("RANK", rank), ("WORLD_SIZE", world), ("LOCAL_RANK", local_rank)):
            os.environ.setdefault(key, str(value))
        dist.init_process_group(backend=backend, rank=rank, world_size=world, timeout=timeout,
                                device_id=device if device.type == "cuda" else None)

    import deepspeed
    from megatron.core import parallel_state

    with library_stdout():  # DeepSpeed prints its shared-memory op build to stdout
        deepspeed.init_distributed(dist_backend=backend, timeout=timeout)  # adopts the existing default group
    if not parallel_state.model_parallel_is_initialized():
        # megatron-core passes timedelta(minutes=distributed_timeout_minutes) to each group it creates.
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=layout.tp,
                                                 pipeline_model_parallel_size=layout.pp,
                                                 context_parallel_size=layout.cp,
                                                 distributed_timeout_minutes=timeout.total_seconds() / 60)
    side = SideCollective(dist.new_group(backend="gloo", timeout=timeout), rank, world)  # every rank, same order
    return DistEnv(rank=rank, world_size=world, local_rank=local_rank, device=device, backend=backend,
                   layout=layout, tp_rank=parallel_state.get_tensor_model_parallel_rank(),
                   pp_rank=parallel_state.get_pipeline_model_parallel_rank(),
                   dp_rank=parallel_state.get_data_parallel_rank(), collective_timeout=timeout, side=side,
                   cp_rank=parallel_state.get_context_parallel_rank())
