"""Things built once per test session and read by many test modules, whichever pytest-xdist worker asks first.

`make test` runs the suite on several xdist workers (one module stays on one worker; see tests/conftest.py). A
session fixture is per worker, so an expensive product (a trained checkpoint, a prepared corpus) that several
modules read is built here under a file lock in the directory all workers share, and read by all of them. A test
that damages what it reads works on its own copy (`copy_of`).
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Callable

import pytest
from filelock import FileLock


def session_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The temporary directory every worker of this session shares (the session's own one without xdist)."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def built_once(tmp_path_factory: pytest.TempPathFactory, name: str, build: Callable[[Path], None]) -> Path:
    """`<shared root>/<name>`, filled by `build(dir)` the first time any worker asks; later callers wait for it.

    A build that raised leaves no `.done` mark, so the next caller builds again (and fails in its own test)."""
    out = session_root(tmp_path_factory) / f"shared-{name}"
    with FileLock(f"{out}.lock"):
        if not (out / ".done").exists():
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir(parents=True)
            build(out)
            (out / ".done").touch()
    return out


def copy_of(source: Path, dest: Path) -> Path:
    """A private copy of a shared run for a test that damages or extends it."""
    shutil.copytree(source, dest, symlinks=True)
    return dest


def without_tokenizer(run_dir: Path, dest: Path) -> Path:
    """A copy of a run whose latest step has lost its tokenizer: the step's copy removed (and from its manifest) and
    the path training recorded pointing nowhere. Returns the copied step directory (still verifying)."""
    import hashlib
    import json

    from pretrain import checkpoint

    shutil.copytree(run_dir, dest, symlinks=True)
    step = dest / (dest / checkpoint.LATEST).read_text().strip()
    shutil.rmtree(step / checkpoint.TOKENIZER_DIR)
    manifest = json.loads((step / checkpoint.MANIFEST).read_text())
    manifest["files"] = {k: v for k, v in manifest["files"].items() if not k.startswith("tokenizer/")}
    meta = json.loads((step / checkpoint.META).read_text())
    meta["resolved"]["tokenizer"]["path"] = str(dest / "gone")
    (step / checkpoint.META).write_text(json.dumps(meta))
    data = (step / checkpoint.META).read_bytes()
    manifest["files"][checkpoint.META] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (step / checkpoint.MANIFEST).write_text(json.dumps(manifest))
    return step
