"""A directory written whole or not at all: what export-hf, import-hf and convert-checkpoint produce.

The tool writes into a hidden temp directory beside the target, which replaces the target (absent or empty) only
when everything is written; a failure or Ctrl-C leaves no half-written model for transformers or `pretrain train`
to pick up.
"""
from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def nearest_existing(path: Path) -> Path:
    """`path`, or its closest ancestor that exists: where a directory not made yet would be created."""
    while not path.exists():
        path = path.parent
    return path


def refuse_non_empty(out_dir: Path) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"{out_dir} is a file; the output must be a new or empty directory")
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir} is not empty; choose a new directory")


@contextmanager
def written_whole(out_dir: str | Path) -> Iterator[Path]:
    """Yield the temp directory to write into; on success it becomes `out_dir`, on any error it is removed."""
    out_dir = Path(out_dir)
    refuse_non_empty(out_dir)
    tmp = out_dir.with_name(f".tmp_{out_dir.name}.{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out_dir.exists():
        out_dir.rmdir()
    os.replace(tmp, out_dir)
