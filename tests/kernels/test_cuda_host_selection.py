"""The suite on a host with one CUDA GPU, checked here by running parts of it in a pytest process that believes
one CUDA device exists (a plugin loaded before any conftest patches torch.cuda): the Triton interpreter cases are
skipped by name, a CPU test's children see no GPU and keep the caller's PYTHONPATH, GPU tests whose optional
dependency is missing are skipped by its name."""
from __future__ import annotations

import subprocess
import sys

import pytest

from spawn import REPO, child_env, python_path

pytestmark = pytest.mark.slow  # each test is a pytest process of its own

PLUGIN = ("import torch\ntorch.cuda.is_available = lambda: True\ntorch.cuda.device_count = lambda: 1\n"
          "torch.cuda.get_device_capability = lambda *a: (9, 0)\n")


def _fake_cuda_pytest(tmp_path, *args: str, **extra_env: str) -> subprocess.CompletedProcess:
    (tmp_path / "fake_cuda.py").write_text(PLUGIN)
    env = child_env(**{"PYTHONPATH": python_path(tmp_path), **extra_env})
    env.pop("TRITON_INTERPRET", None)  # as on a CUDA host: nothing set it
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "fake_cuda", "-p", "no:cacheprovider", "-rs",
                           *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=180)


def test_interpreter_cases_are_skipped_where_cuda_is_present(tmp_path):
    p = _fake_cuda_pytest(tmp_path, "-k", "interpreter", "tests/kernels", "tests/plan/test_activations.py")
    assert p.returncode in (0, 5), p.stdout[-3000:]  # 5: every selected test skipped
    assert "failed" not in p.stdout and "error" not in p.stdout.lower(), p.stdout[-3000:]
    assert "Triton interpreter case" in p.stdout, p.stdout[-3000:]


def test_cpu_tests_launch_cpu_children_on_a_cuda_host(tmp_path):
    site = tmp_path / "site"  # a package directory that reaches the tests only through PYTHONPATH
    site.mkdir()
    (site / "extra_site_module.py").write_text("")
    p = _fake_cuda_pytest(tmp_path, "tests/kernels/cuda_host_probe.py",
                          PYTHONPATH=python_path(tmp_path, site))
    assert p.returncode == 0 and "2 passed" in p.stdout, p.stdout[-3000:]


def test_a_gpu_test_whose_dependency_is_absent_is_skipped_by_its_name(tmp_path):
    (tmp_path / "no_torchao.py").write_text("import sys\nsys.modules['torchao'] = None\n")
    p = _fake_cuda_pytest(tmp_path, "-p", "no_torchao", "-k", "on_cuda", "tests/parallel/test_fp8.py")
    assert p.returncode == 0 and "failed" not in p.stdout and "error" not in p.stdout.lower(), p.stdout[-3000:]
    assert "torchao" in p.stdout and "skipped" in p.stdout, p.stdout[-3000:]
