"""The libraries imported without the start-up costs they charge for features this project never uses.

A training rank spends most of its start-up importing torch, DeepSpeed and megatron-core (about 6.5 s of CPU on a
2-core machine for well under a second of work in a short run). Three of those costs buy nothing here, and
`lighten_imports` (import hooks, installed first thing in a process) removes them:

- `import deepspeed` imports its autotuner, which imports MLflow (with pandas) at module level to log its own tuning
  experiments: about 1.3 s and 110 MB on every rank, though only rank 0 of a tracked run talks to MLflow
  (pretrain/telemetry/tracking.py imports it there, when needed). MLflow is hidden for the length of DeepSpeed's package
  import, so the autotuner records `has_mlflow = False`, which matters only to `deepspeed --autotuning`.
- DeepSpeed's ZeRO and bf16 optimizers import its Muon optimizer when they are built (to check whether they wrap
  one), and that module decorates its kernels with `torch.compile`, which imports inductor: about 1.6 s on every
  rank of a ZeRO or bf16 run. The Muon module is imported once, right after DeepSpeed, with DeepSpeed's
  `compiler.compile()` answering a no-op decorator; this project never builds a Muon optimizer.
- megatron-core decorates its fused helpers (bias-GeLU, bias-SwiGLU, fused cross-entropy, MoE routing...) with
  `torch.compile` as its modules are imported: about 1.8 s alone, 1.2 s in a training rank, whose optimizer
  imports torch._dynamo anyway. This project uses megatron-core's tensor-parallel layers, vocab-parallel
  cross-entropy and process groups, never those helpers (its own fused kernels are in pretrain/kernels/), so
  megatron-core calls its own `disable_jit_fuser()` before its fusion modules are imported. `model.compile` still
  compiles our blocks.

Measured with megatron-core 0.16.1 and DeepSpeed 0.19; tests/train/test_libraries.py checks that each cost still
exists, so a library release that removes one says so by failing there.

A fourth is DeepSpeed's compiled CPU comm op, built once per environment (`_deepspeed_ops_per_environment`), not
once per alternation between two environments.

A last cost comes at the end: the interpreter's teardown frees the module graph of torch, DeepSpeed and
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
_DEEPSPEED = "deepspeed"
_MUON = "deepspeed.runtime.zero.muon.original_muon"


def lighten_imports() -> None:
    """Install the import hooks below, and keep DeepSpeed's compiled ops with this environment. Call it first thing
    in a process (`pretrain.cli.main` does, and so do the tests' rank workers): a library already imported by then
    is past helping (megatron-core's later helpers still are)."""
    _deepspeed_ops_per_environment()
    if _MEGATRON_JIT in sys.modules:
        sys.modules[_MEGATRON_JIT].disable_jit_fuser()
    elif not _hooked(_MEGATRON_JIT):
        sys.meta_path.insert(0, _AroundImport(_MEGATRON_JIT, _megatron_without_fusions))
    if _DEEPSPEED not in sys.modules and not _hooked(_DEEPSPEED):
        sys.meta_path.insert(0, _AroundImport(_DEEPSPEED, _deepspeed_without_extras))


def _deepspeed_ops_per_environment() -> None:
    """On a host without CUDA, DeepSpeed JIT-builds its shared-memory comm op at the first `init_distributed` (about
    50 s of CPU on 2 cores) into torch's extension cache, by default one directory per Python version for the whole
    user. The build command names the environment's site-packages, so two environments on one machine (two clones,
    a CI checkout beside a working one) rebuild it for each other at every alternate start. One cache per
    environment, inside it, where it is writable (`TORCH_EXTENSIONS_DIR` set by the user wins)."""
    if os.access(sys.prefix, os.W_OK):
        os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(sys.prefix, "torch_extensions"))


def import_deepspeed() -> ModuleType:
    """`import deepspeed`, as light as `lighten_imports` makes it."""
    lighten_imports()
    return importlib.import_module(_DEEPSPEED)


def _megatron_without_fusions(execute: Callable[[], None], jit: ModuleType) -> None:
    execute()
    jit.disable_jit_fuser()


def _deepspeed_without_extras(execute: Callable[[], None], deepspeed: ModuleType) -> None:
    """DeepSpeed's package imported with MLflow hidden, then its Muon module imported with `torch.compile` made a
    no-op: its kernels stay plain functions, fine for an optimizer this project never builds."""
    hide = "mlflow" not in sys.modules
    if hide:
        sys.modules["mlflow"] = None  # type: ignore[assignment]  # `import mlflow` raises ImportError meanwhile
    try:
        execute()
    finally:
        if hide and "mlflow" in sys.modules and sys.modules["mlflow"] is None:
            del sys.modules["mlflow"]
    compiler = importlib.import_module("deepspeed.runtime.compiler")
    real = compiler.compile
    compiler.compile = lambda: (lambda fn: fn)
    try:
        importlib.import_module(_MUON)
    except ImportError:  # a DeepSpeed release without Muon
        pass
    finally:
        compiler.compile = real


def _hooked(name: str) -> bool:
    return any(isinstance(f, _AroundImport) and f.name == name for f in sys.meta_path)


class _AroundImport(importlib.abc.MetaPathFinder):
    """Runs module `name` through `around(execute, module)` when it is first imported, before any other module can
    import from it: megatron.core.jit is first imported halfway through megatron.core's own __init__, with no
    earlier hook, and DeepSpeed's MLflow import happens inside its own package import."""

    def __init__(self, name: str, around: Callable[[Callable[[], None], ModuleType], None]):
        self.name, self.around = name, around

    def find_spec(self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None):
        if fullname != self.name:
            return None
        sys.meta_path.remove(self)  # once; and the real finders below answer the lookup
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return spec
        execute = spec.loader.exec_module

        def exec_module(module: ModuleType) -> None:
            self.around(lambda: execute(module), module)
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
