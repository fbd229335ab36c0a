"""Checks that must fail before any rank waits on a rendezvous: the allocation must fit the run.

A world size that tp x pp does not divide only surfaces after every rank has joined the rendezvous and built
its process groups; on a real cluster that is minutes of queue time and a hung step if one node errors out
first. The launcher knows the world size (nodes x ranks per node) before starting anything, and the training
command names its config, so the check runs here, on every node, identically.
"""
from __future__ import annotations

from pathlib import Path

from launch.plan import LaunchError, LaunchPlan


def config_args(command: list[str]) -> tuple[str | None, list[str]]:
    """`--config FILE` and every `--set k=v` of the training command (both `--opt v` and `--opt=v`)."""
    config: str | None = None
    overrides: list[str] = []
    i = 0
    while i < len(command):
        arg = command[i]
        for name in ("--config", "--set"):
            if arg == name and i + 1 < len(command):
                value = command[i + 1]
                i += 1
            elif arg.startswith(name + "="):
                value = arg.split("=", 1)[1]
            else:
                continue
            if name == "--config":
                config = value
            else:
                overrides.append(value)
            break
        i += 1
    return config, overrides


def _allocation(plan: LaunchPlan) -> str:
    return f"{plan.world_size} ({plan.nnodes} node{'s' if plan.nnodes > 1 else ''} x {plan.nproc_per_node} per node)"


def check_world(plan: LaunchPlan, command: list[str], expect_world: int | None = None) -> None:
    """Raise LaunchError (one line, both numbers) if the allocation cannot run this command's config."""
    if expect_world is not None and expect_world != plan.world_size:
        raise LaunchError(f"--expect-world {expect_world} but the allocation gives world size {_allocation(plan)}")
    config, overrides = config_args(command)
    if config is None:
        return
    from pretrain.config import ConfigError, load_config

    try:
        cfg = load_config(Path(config), overrides)
    except ConfigError as e:
        raise LaunchError(str(e)) from None
    tp, pp = cfg.parallel.tp, cfg.parallel.pp
    if plan.world_size % (tp * pp) != 0:
        raise LaunchError(f"{config}: parallel.tp x parallel.pp = {tp} x {pp} = {tp * pp} does not divide the "
                          f"allocation's world size {_allocation(plan)}; launch a multiple of {tp * pp} ranks")
