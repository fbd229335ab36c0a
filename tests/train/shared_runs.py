"""Training runs built once per test session and read by several test modules (tests/shared.py's `built_once`).

Launching `pretrain train` costs seconds of imports (torch, megatron-core, DeepSpeed) for well under a second of
training the debug model, so modules that only need *a* finished run read one built here instead of each training
its own. The runs are read-only: a test that damages or extends one works on a copy (`shared.copy_of`).
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from shared import built_once
from train_common import run_python, tiny_shards, train_args


def plain_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(run dir, its shards): one rank, fp32, ZeRO-0, no tracking, 4 steps checkpointed at steps 2 and 4
    (`latest` is step_4)."""
    def build(out: Path) -> None:
        data = tiny_shards(out / "data")  # this worker's cached corpus if it has one: copied in, to stay put
        if data != out / "data":
            shutil.copytree(data, out / "data")
        p = run_python(train_args(out / "data" / "shards", out / "run", "train.max_steps=4", "checkpoint.every=2"))
        assert p.returncode == 0, p.stderr[-3000:]

    root = built_once(tmp_path_factory, "plain-run", build)
    return root / "run", root / "data" / "shards"
