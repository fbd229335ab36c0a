"""What a training run prints: the project's own lines; the libraries' start-up chatter only with `--verbose`.

A clean start shows lines that begin with one of PROJECT_PREFIXES. What is quieted says nothing a user can act
on: DeepSpeed's "deepspeed_shm_comm_op built successfully" (a print to stdout in deepspeed.comm.torch), its
"ZeRO with an untested optimizer" (our AdamW is chosen on purpose) and "Setting accelerator to CPU" (we asked for
CPU); MLflow's INFO lines about creating its database tables; warnings raised inside torch, megatron-core,
DeepSpeed or MLflow about their own internals (e.g. torch's FutureWarning on the all_gather_into_tensor that
DeepSpeed's ZeRO calls; megatron-core's "Transformer Engine and Apex are not installed"). Errors are not hidden:
library loggers are raised to ERROR, not switched off, and tracebacks pass.
"""
from __future__ import annotations

import contextlib
import logging
import os
import sys
import warnings
from typing import Iterator

from pretrain.libraries import import_deepspeed

# Every line a run prints to stdout/stderr without --verbose starts with one of these (tests/train/test_quiet.py).
PROJECT_PREFIXES = ("[train]", "[checkpoint]", "[tracking]", "[data]", "step ", "done:", "checkpoints:", "metrics:",
                    "mlflow:", "             ", "error:", "note:", "launch")
# A warning is the project's own when raised from one of its packages; any other is a library's.
_NOT_OURS = r"(?!(pretrain|data_pipeline|launch)(\.|$))"

_verbose = True  # library output untouched until `quiet` says otherwise


def say(msg: str, topic: str = "train") -> None:
    """One of the project's own lines, on stderr: `[topic] msg` (topics: train, checkpoint, tracking)."""
    print(f"[{topic}] {msg}", file=sys.stderr, flush=True)


def say_from_signal_handler(msg: str) -> None:
    """`say` from inside a signal handler, on rank 0: a raw write, since print() may be in the middle of writing to
    stderr already."""
    if os.environ.get("RANK", "0") == "0":
        os.write(2, f"[train] {msg}\n".encode())


def error(msg: str) -> None:
    """The one line a refused input ends with (`error: ...`, exit 2 follows)."""
    print(f"error: {msg}", file=sys.stderr, flush=True)


def quiet(*, verbose: bool, cpu: bool) -> None:
    """Call once, before the libraries are imported by the training (DeepSpeed reads DS_ACCELERATOR at import;
    MLflow reads MLFLOW_LOGGING_LEVEL when it configures its loggers)."""
    global _verbose
    _verbose = verbose
    if cpu:  # functional, not cosmetic: DeepSpeed would probe for accelerators and warn that it fell back to CPU
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import_deepspeed()  # first, and after DS_ACCELERATOR: without the MLflow import (pretrain/libraries.py)
    if verbose:
        return
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    warnings.filterwarnings("ignore", module=_NOT_OURS)
    from deepspeed.utils.logging import logger as deepspeed_logger  # its level is set when it is created

    deepspeed_logger.setLevel(logging.ERROR)
    for name in ("megatron", "torch"):
        logging.getLogger(name).setLevel(logging.ERROR)


@contextlib.contextmanager
def library_stdout() -> Iterator[None]:
    """Drop what a library prints to stdout inside this block, unless --verbose."""
    if _verbose:
        yield
        return
    with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):
        yield
