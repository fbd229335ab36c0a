"""The libraries imported without the start-up costs they charge for features this project never uses.

A training rank spends most of its start-up importing torch, DeepSpeed and megatron-core (about 6.5 s of CPU on a
2-core machine for well under a second of work in a short run). Two of those costs buy nothing here:

- `import deepspeed` imports its autotuner, which imports MLflow (with pandas) at module level to log its own tuning
  experiments: about 1.3 s and 110 MB on every rank, though only rank 0 of a tracked run talks to MLflow
  (pretrain/tracking.py imports it there, when needed). `import_deepspeed` hides MLflow for the length of DeepSpeed's
  import, so the autotuner records `has_mlflow = False`, which matters only to `deepspeed --autotuning`.
- megatron-core decorates its fused helpers (bias-GeLU, bias-SwiGLU, fused cross-entropy, MoE routing...) with
  `torch.compile` as its modules are imported, which imports torch._dynamo and inductor (with jinja2, networkx and
  more): about 1.8 s alone, 1.2 s in a training rank, whose optimizer imports torch._dynamo anyway. This project
  uses megatron-core's tensor-parallel layers, vocab-parallel cross-entropy and process groups, never those helpers
  (its own fused kernels are in pretrain/kernels/), so `skip_megatron_fusions` makes megatron-core call its own
  `disable_jit_fuser()` before its fusion modules are imported. `model.compile` still compiles our blocks.

Both were measured with megatron-core 0.16.1 and DeepSpeed 0.19; tests/train/test_libraries.py checks that each
cost still exists, so a library release that removes one says so by failing there.

A third cost comes at the end: the interpreter's teardown frees the module graph of torch, DeepSpeed and
megatron-core object by object, about 1 s of CPU per process (0.5 s for torch alone) for memory the OS reclaims
anyway. `exit_now` does what exit does first (joins non-daemon threads and executors, runs the atexit handlers,
flushes stdout and stderr) and then ends the process without the teardown.
"""
from __future__ import annotations

import atexit
import importlib
import importlib.abc
import importlib.machinery
import os
import sys
import threading
from types import ModuleType
from typing import Callable, NoReturn, Sequence

_MEGATRON_JIT = "megatron.core.jit"


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


def skip_megatron_fusions() -> None:
    """Make megatron-core's fused helpers plain functions (call before megatron-core is first imported; later, it
    only stops helpers decorated from then on)."""
    if _MEGATRON_JIT in sys.modules:
        sys.modules[_MEGATRON_JIT].disable_jit_fuser()
    elif not any(isinstance(f, _AfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterImport(_MEGATRON_JIT, lambda jit: jit.disable_jit_fuser()))


class _AfterImport(importlib.abc.MetaPathFinder):
    """Runs `then(module)` as soon as module `name` has executed, before any other module can import from it:
    megatron.core.jit is first imported halfway through megatron.core's own __init__, with no earlier hook."""

    def __init__(self, name: str, then: Callable[[ModuleType], None]):
        self.name, self.then = name, then

    def find_spec(self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None):
        if fullname != self.name:
            return None
        sys.meta_path.remove(self)  # once; and the real finders below answer the lookup
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return spec
        execute = spec.loader.exec_module

        def exec_module(module: ModuleType) -> None:
            execute(module)
            self.then(module)
        spec.loader.exec_module = exec_module  # type: ignore[method-assign]  # this spec's own loader instance
        return spec


def exit_now(code: int | None) -> NoReturn:
    """End the process with `code` as `raise SystemExit(code)` would, less the interpreter's teardown.

    The checkpoint writer's executor and any non-daemon thread are joined first (threading's own shutdown, as
    interpreter exit runs it), then the atexit handlers (MLflow, logging, coverage.py); files the project writes are
    closed or line-buffered before this. Where threading has no `_shutdown` (a future Python), it falls back to a
    normal exit."""
    shutdown = getattr(threading, "_shutdown", None)
    if shutdown is None:
        raise SystemExit(code)
    shutdown()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed or broken pipe: nothing more can reach it
            pass
    os._exit(0 if code is None else code)
