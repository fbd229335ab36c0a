"""Real process launches for tests: child environments and `torchrun` on gloo/CPU (NCCL where CUDA is)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def python_path(*first: str | Path) -> str:
    """`first`, the repository, then whatever PYTHONPATH this process was given."""
    inherited = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    return os.pathsep.join(dict.fromkeys([*map(str, first), str(REPO), *inherited]))


def child_env(**extra: str) -> dict[str, str]:
    """Environment for a child process: one thread per rank (2 cores, 2 ranks), the repo importable first and the
    caller's PYTHONPATH kept after it (a cluster's module system or a `pip --target` install lives there)."""
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHONPATH=python_path(), TOKENIZERS_PARALLELISM="false")
    env.update(extra)
    return env


def torchrun(nproc: int, args: list[str], *, timeout: float = 300, cwd: Path | None = None,
             env: dict[str, str] | None = None, check: bool = True) -> subprocess.CompletedProcess:
    """Run `python -m torch.distributed.run --standalone --nproc-per-node N <args>` for real, on gloo/CPU."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *args]
    proc = subprocess.run(cmd, cwd=cwd or REPO, env=env or child_env(), capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"torchrun exited {proc.returncode}\n--- stdout\n{proc.stdout[-6000:]}"
                             f"\n--- stderr\n{proc.stderr[-8000:]}")
    return proc
