"""A rank's start-up pays only for the libraries it uses (pretrain/libraries.py)."""
from __future__ import annotations

import subprocess
import sys

import pytest

from spawn import REPO, child_env

pytestmark = pytest.mark.slow  # imports DeepSpeed and MLflow in a child: seconds


def test_deepspeed_imports_without_mlflow_and_mlflow_still_imports_after_it():
    code = ("import sys; from pretrain.libraries import import_deepspeed; ds = import_deepspeed(); "
            "print('mlflow' in sys.modules); import mlflow; print(ds.__name__, mlflow.__name__)")
    p = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=child_env(DS_ACCELERATOR="cpu"),
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.split() == ["False", "deepspeed", "mlflow"]


def test_a_plain_import_of_deepspeed_still_pulls_mlflow_in():
    """The other half of the claim: if DeepSpeed stops importing MLflow, pretrain/libraries.py can go."""
    code = "import sys, deepspeed; print('mlflow' in sys.modules)"
    p = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=child_env(DS_ACCELERATOR="cpu"),
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.split() == ["True"]
