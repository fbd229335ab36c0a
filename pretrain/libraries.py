"""DeepSpeed imported without the MLflow import it makes for a feature this trainer never uses.

`import deepspeed` imports its autotuner, and the autotuner imports MLflow (with pandas) at module level to log its
own tuning experiments. That costs every rank about 1.3 s of CPU and 110 MB of memory at start-up, though only
rank 0 of a tracked run talks to MLflow (pretrain/tracking.py imports it there, when it is needed). Hiding MLflow
for the length of DeepSpeed's import makes the autotuner record `has_mlflow = False`, which matters only to
`deepspeed --autotuning`; MLflow stays importable afterwards.
"""
from __future__ import annotations

import importlib
import sys
from types import ModuleType


def import_deepspeed() -> ModuleType:
    """`import deepspeed`, leaving MLflow unimported if it was (call before anything else imports DeepSpeed)."""
    if "deepspeed" in sys.modules or "mlflow" in sys.modules:
        return importlib.import_module("deepspeed")
    sys.modules["mlflow"] = None  # type: ignore[assignment]  # `import mlflow` raises ImportError meanwhile
    try:
        return importlib.import_module("deepspeed")
    finally:
        if "mlflow" in sys.modules and sys.modules["mlflow"] is None:
            del sys.modules["mlflow"]
