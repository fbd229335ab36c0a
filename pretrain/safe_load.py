"""Reading checkpoint files without running code from them.

A `.pt` file is a pickle, and unpickling may call any importable function: a checkpoint copied from elsewhere, or
edited on a shared filesystem, could run a command in every process that loads it (`pretrain train` resuming or
starting from `model.init_from`, `generate`, `export-hf`, `convert-checkpoint`). Every load here goes through
torch's restricted unpickler (`weights_only=True`), which builds tensors, numbers, strings and containers and
nothing else, plus the few classes our checkpoints really hold:

- DeepSpeed's optimizer files: its loss scaler (`LossScaler`, `DynamicLossScaler`), the ZeRO stage enum and the
  `fragment_address` records of each parameter's slice;
- our rank files: NumPy's RNG state (an array of uint32 and its dtype).

A file that needs anything else is refused in one line naming the file and the object it asked for.
DeepSpeed's own loads (resume, the pipeline's layer files) read through its checkpoint engine, whose torch
backend passes `weights_only=False`; `guard_deepspeed` points that engine's `load` here.
"""
from __future__ import annotations

import functools
import pickle
import re
from pathlib import Path
from typing import Any

import torch


@functools.lru_cache(maxsize=1)
def allowed_globals() -> tuple[Any, ...]:
    import numpy as np
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    multiarray = getattr(np, "_core", None) or np.core  # NumPy 2 renamed np.core to np._core
    return (LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address,
            np.ndarray, np.dtype, multiarray.multiarray._reconstruct, type(np.dtype("uint32")))


def load(path: str | Path, map_location: Any = "cpu", *, mmap: bool = False) -> Any:
    """torch.load restricted to tensors, plain data and `allowed_globals()`."""
    try:
        with torch.serialization.safe_globals(list(allowed_globals())):
            return torch.load(path, map_location=map_location, mmap=mmap, weights_only=True)
    except pickle.UnpicklingError as e:
        from pretrain.checkpoint import CheckpointError

        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        what = f"`{found.group(1)}`" if found else "an object outside the allowed list"
        raise CheckpointError(f"{path}: refusing to load it: it asks to run or build {what}, which no checkpoint "
                              f"written by this project contains (a pickle can run code when it is loaded)") from None


def guard_deepspeed(ds_engine: Any) -> None:
    """Make a DeepSpeed engine read its checkpoint files through `load`. Its torch checkpoint engine calls
    torch.load(..., weights_only=False); only that one method is replaced, on this engine's instance."""
    ds_engine.checkpoint_engine.load = lambda path, map_location=None: load(path, map_location)
