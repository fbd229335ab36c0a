"""A real two-node SLURM cluster for the session (scripts/slurm_cluster.sh), started once and stopped at the end.

It needs root (apt-get for Debian's slurm-wlm + munge, the daemons, /etc/hosts entries); that is the only reason to
skip. In CI we are root, so there a cluster that fails to start is a test failure, never a skip.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Iterator

import pytest

from slurm_helpers import SCRIPT, Cluster


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[Cluster]:
    if os.geteuid() != 0:
        pytest.skip("the local SLURM cluster needs root (apt-get install slurm-wlm munge, daemons, /etc/hosts)")
    if shutil.which("slurmctld") is None and shutil.which("apt-get") is None:
        pytest.skip("SLURM is not installed and apt-get is unavailable to install Debian's slurm-wlm")
    started = time.monotonic()
    proc = subprocess.run([str(SCRIPT), "start"], capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        pytest.fail(f"scripts/slurm_cluster.sh start failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    print(f"\nlocal SLURM cluster up in {time.monotonic() - started:.1f} s: {proc.stderr.strip()}")
    conf = Path(subprocess.run([str(SCRIPT), "env"], capture_output=True, text=True, check=True)
                .stdout.strip().split("=", 1)[1])
    try:
        yield Cluster(conf)
    finally:
        subprocess.run([str(SCRIPT), "stop"], capture_output=True, text=True, timeout=120)


