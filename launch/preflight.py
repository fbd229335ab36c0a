"""Checks that must fail before any rank waits on a rendezvous: the allocation must fit the run.

A world size that tp x cp x pp does not divide only surfaces after every rank has joined the rendezvous and built
its process groups; on a real cluster that is minutes of queue time and a hung step if one node errors out
first. The launcher knows the world size (nodes x ranks per node) before starting anything, and the training
command names its config, so the check runs here, on every node, identically.
"""
from __future__ import annotations

from pathlib import Path

from data_pipeline.errors import DataError
from launch.plan import LaunchError, LaunchPlan
from pretrain.config import ConfigError, load_config
from pretrain.run.resolved import resolve_run


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
    """Raise LaunchError (one line, both numbers) if the allocation cannot run this command's config.

    The check is the training's own: `resolve_run` for the allocation's world size, i.e. every layout rule and,
    when data.path names shards here, the data checks (tokenizer, validation shards, enough documents for every
    DP rank x worker) that the training would otherwise hit after the rendezvous. Without shards (another
    machine's path, or a command that is not `pretrain train`) only the layout is checked: the vocabulary then
    only sets the padding, which no rule refuses."""
    if expect_world is not None and expect_world != plan.world_size:
        raise LaunchError(f"--expect-world {expect_world} but the allocation gives world size {_allocation(plan)}")
    config, overrides = config_args(command)
    if config is None:
        return

    try:
        cfg = load_config(Path(config), overrides)
    except ConfigError as e:
        raise LaunchError(str(e)) from None
    try:
        resolve_run(cfg, plan.world_size, require_data=False, vocab_without_data=cfg.model.vocab_size or 1)
    except ConfigError as e:
        raise LaunchError(f"{config}: {e}; the allocation gives world size {_allocation(plan)}") from None
    except DataError as e:
        raise LaunchError(f"{config}: {e}") from None
