"""On a CUDA host the kernel tests must not launch the GPU-compiled kernels on CPU tensors: the interpreter cases
are skipped by name there. Checked here by running the kernel tests in a process that believes CUDA is present
(torch.cuda.is_available patched by a plugin loaded before any conftest)."""
from __future__ import annotations

import subprocess
import sys

from spawn import REPO, child_env

PLUGIN = "import torch\ntorch.cuda.is_available = lambda: True\n"


def test_interpreter_cases_are_skipped_where_cuda_is_present(tmp_path):
    (tmp_path / "fake_cuda.py").write_text(PLUGIN)
    env = child_env(PYTHONPATH=f"{tmp_path}:{REPO}")
    env.pop("TRITON_INTERPRET", None)  # as on a CUDA host: nothing set it
    p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "fake_cuda", "-p", "no:cacheprovider", "-rs",
                        "-k", "interpreter", "tests/kernels", "tests/plan/test_activations.py"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode in (0, 5), p.stdout[-3000:]  # 5: every selected test skipped
    assert "failed" not in p.stdout and "error" not in p.stdout.lower(), p.stdout[-3000:]
    assert "Triton interpreter case" in p.stdout, p.stdout[-3000:]
