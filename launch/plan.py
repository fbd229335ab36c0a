"""Where am I in the allocation? SLURM's environment (or none) -> a torchrun launch plan.

Pure: the inputs are an environment mapping and a hostlist expander, the output a frozen `LaunchPlan`, so the
derivation is unit-tested with plain dicts and the same code runs under `srun`.

Under SLURM the contract is one launcher task per node (`srun --ntasks-per-node=1`): each task starts one
torchrun agent that owns `nproc_per_node` local ranks. Rendezvous is static (`--node-rank` given), because every
number it needs is already known from SLURM; the c10d/etcd elastic rendezvous would only add a way to hang.
"""
from __future__ import annotations

import os
import shlex
from dataclasses import dataclass, field
from typing import Callable, Mapping

from launch.nodelist import expand_hostlist

PORT_BASE = 20000
PORT_SPAN = 20000


class LaunchError(RuntimeError):
    """The environment cannot be turned into a launch: one line saying what is wrong and what to do."""


@dataclass(frozen=True)
class LaunchPlan:
    nnodes: int
    node_rank: int
    nproc_per_node: int
    master_addr: str | None  # None: a single-node standalone rendezvous (torchrun picks a free port)
    master_port: int | None
    env: dict[str, str] = field(default_factory=dict)  # variables the launcher adds (never overrides the user's)
    job_id: str | None = None

    @property
    def world_size(self) -> int:
        return self.nnodes * self.nproc_per_node

    @property
    def standalone(self) -> bool:
        return self.master_addr is None

    def torchrun_args(self, command: list[str]) -> list[str]:
        """Arguments of `python -m torch.distributed.run` for this node, followed by the training command."""
        if self.standalone:
            head = ["--standalone", "--nnodes", "1"]
        else:
            head = ["--nnodes", str(self.nnodes), "--node-rank", str(self.node_rank),
                    "--master-addr", str(self.master_addr), "--master-port", str(self.master_port),
                    "--rdzv-backend", "static"]
        # Each rank runs `python -m launch.rank <command>`: a shim that keeps an early SIGUSR1 from killing a
        # rank that has not installed its handler yet (launch/rank.py says why).
        return [*head, "--nproc-per-node", str(self.nproc_per_node), "--max-restarts", "0",
                "-m", "launch.rank", *command]

    def describe(self, command: list[str], python: str = "python") -> str:
        """The resolved launch line, as a user could paste it (added environment first)."""
        env = " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(self.env.items()))
        line = shlex.join([python, "-m", "torch.distributed.run", *self.torchrun_args(command)])
        return f"{env} {line}" if env else line


def master_port_for(job_id: str) -> int:
    """Same port on every node of a job without talking to each other: a function of the job id only.

    Two jobs sharing a node collide only when their ids are equal mod PORT_SPAN; the range 20000-39999 stays below
    Linux's default ephemeral ports (32768+ only partly overlaps; torchrun fails loudly on a taken port).
    """
    digits = "".join(ch for ch in job_id if ch.isdigit())
    if not digits:
        raise LaunchError(f"SLURM job id {job_id!r} has no digits to derive a master port from; pass --master-port")
    return PORT_BASE + int(digits) % PORT_SPAN


def _int(env: Mapping[str, str], key: str) -> int:
    try:
        return int(env[key])
    except ValueError:
        raise LaunchError(f"${key}={env[key]!r} is not an integer") from None


def default_nproc_per_node() -> int:
    """One rank per visible GPU; one rank on a CPU-only node."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 1


def runtime_env(env: Mapping[str, str], nproc_per_node: int) -> dict[str, str]:
    """Variables a multi-node job needs, for those the user has not set.

    - PYTHONFAULTHANDLER: a rank stuck or crashing in C code prints every thread's Python stack.
    - TORCH_NCCL_ASYNC_ERROR_HANDLING=1: a NCCL collective that times out (or a peer that dies) tears the process
      down instead of hanging the whole allocation until the wall-clock limit; torchrun then reports the failure.
      TORCH_NCCL_BLOCKING_WAIT is deliberately NOT set: it makes every collective synchronous (slow) and gives
      nothing the async handler does not, once the process-group timeout is the one the training sets.
    - OMP_NUM_THREADS: the task's CPUs split across its local ranks (torch would otherwise start one thread per
      core in every rank and oversubscribe the node).
    """
    out = {"PYTHONFAULTHANDLER": "1", "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1"}
    if "SLURM_CPUS_PER_TASK" in env:
        cpus = _int(env, "SLURM_CPUS_PER_TASK")
    else:
        cpus = os.cpu_count() or 1
    out["OMP_NUM_THREADS"] = str(max(1, cpus // max(1, nproc_per_node)))
    return {k: v for k, v in out.items() if k not in env}


def plan_from_env(env: Mapping[str, str], nproc_per_node: int, *,
                  expand: Callable[[str], list[str]] = expand_hostlist,
                  master_port: int | None = None) -> LaunchPlan:
    """The plan for this process: under SLURM (a job step) a static multi-node rendezvous, else standalone."""
    if nproc_per_node < 1:
        raise LaunchError(f"--nproc-per-node must be >= 1, got {nproc_per_node}")
    job_id = env.get("SLURM_JOB_ID")
    if job_id is None:
        return LaunchPlan(1, 0, nproc_per_node, None, None, runtime_env(env, nproc_per_node))

    # Inside a step (srun) SLURM_STEP_* describe the nodes this step runs on, which may be fewer than the job's.
    in_step = "SLURM_STEP_ID" in env or "SLURM_STEPID" in env
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    nnodes_key = next((k for k in ("SLURM_STEP_NUM_NODES", "SLURM_NNODES", "SLURM_JOB_NUM_NODES") if k in env), None)
    if nodelist is None or nnodes_key is None:
        raise LaunchError("SLURM_JOB_ID is set but SLURM_JOB_NODELIST / SLURM_NNODES are not; run under sbatch/srun")
    nnodes = _int(env, nnodes_key)
    if nnodes > 1 and not in_step:
        raise LaunchError(f"this is the batch shell of a {nnodes}-node job, not a job step: start the launcher "
                          "with `srun --ntasks-per-node=1 python -m launch ...` so every node runs one")
    ntasks = _int(env, "SLURM_STEP_NUM_TASKS") if "SLURM_STEP_NUM_TASKS" in env else nnodes
    if in_step and ntasks != nnodes:
        raise LaunchError(f"the launcher wants one task per node but this step has {ntasks} tasks on {nnodes} "
                          "nodes; use `srun --ntasks-per-node=1` (torchrun starts the ranks of a node)")
    node_rank = _int(env, "SLURM_NODEID") if "SLURM_NODEID" in env else _int(env, "SLURM_PROCID")
    if not 0 <= node_rank < nnodes:
        raise LaunchError(f"SLURM_NODEID={node_rank} is outside 0..{nnodes - 1}")

    hosts = expand(nodelist)
    if len(hosts) != nnodes:
        raise LaunchError(f"nodelist {nodelist!r} expands to {len(hosts)} hosts but ${nnodes_key}={nnodes}")
    port = master_port if master_port is not None else master_port_for(job_id)
    return LaunchPlan(nnodes, node_rank, nproc_per_node, hosts[0], port, runtime_env(env, nproc_per_node), job_id)
