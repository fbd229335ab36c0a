"""Every Triton kernel computes row offsets in 64-bit: in the interpreter, rows placed past 2^31 elements (views
into a sparse 8 GiB file, tests/kernels/offsets_probe.py) give the eager result. A 32-bit offset wraps 8 GiB
away and the probe segfaults, so it runs in its own process. Runs on CUDA hosts too (the interpreter on CPU)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from spawn import REPO, child_env

pytest.importorskip("triton")


def test_every_kernel_addresses_rows_past_2_31_elements(tmp_path):
    probe = Path(__file__).with_name("offsets_probe.py")
    p = subprocess.run([sys.executable, str(probe), str(tmp_path)], cwd=REPO, env=child_env(TRITON_INTERPRET="1"),
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, f"probe exited {p.returncode} (-11: a kernel addressed a wrapped offset)\n{p.stderr[-3000:]}"
    errors = json.loads(p.stdout.splitlines()[-1])
    assert set(errors) == {"cross_entropy_fwd", "cross_entropy_bwd", "rmsnorm_fwd", "rmsnorm_bwd", "rope",
                           "swiglu_fwd", "swiglu_bwd"}
    assert max(errors.values()) < 1e-5, errors
