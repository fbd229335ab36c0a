"""How checkpoint files are written and read: hashed while they are written, and read without running code.

Writing. Every `.pt` of a step (ours, and DeepSpeed's through its checkpoint engine) is written through a file
object that feeds a sha256 as the bytes go out, so the manifest holds every file's hash without a second read of
shards that are gigabytes each. Each rank keeps the digests of what it wrote (`take_digests`); the checkpoint's
commit gathers them into the manifest (pretrain/checkpoint/commit.py).

Reading. 
A `.pt` file is a pickle, and unpickling may call any importable function: a checkpoint copied from elsewhere, or
edited on a shared filesystem, could run a command in every process that loads it (`pretrain train` resuming or
starting from `model.init_from`, `generate`, `export-hf`, `convert-checkpoint`). Every load here goes through
torch's restricted unpickler (`weights_only=True`), which builds tensors, numbers, strings and containers and
nothing else, plus the few classes our checkpoints really hold:

- DeepSpeed's optimizer files: its loss scaler (`LossScaler`, `DynamicLossScaler`), the ZeRO stage enum and the
  `fragment_address` records of each parameter's slice;
- our rank files: NumPy's RNG state (an array of uint32 and its dtype).

A file that needs anything else is refused in one line naming the file and the object it asked for.
DeepSpeed's own loads and saves (resume, the pipeline's layer files) go through its checkpoint engine, whose
torch backend loads with `weights_only=False`; `adopt_deepspeed` points that engine's `load` and `save` here.
"""
from __future__ import annotations

import contextlib
import copy
import ctypes
import errno
import functools
import hashlib
import mmap
import os
import pickle
import re
import threading
from pathlib import Path
from typing import Any, Iterator

import torch

from pretrain.checkpoint.records import CheckpointError
from pretrain.run.progress import progress


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
    """torch.load restricted to tensors, plain data and `allowed_globals()`. Whatever stops the load (a refused
    object, a truncated or foreign file: torch says RuntimeError, EOFError, KeyError, ... by case) is a
    CheckpointError naming the file, so every command that reads a checkpoint says it in one line."""

    if os.path.islink(path):  # verify refused it already where a step was verified; here for every other caller
        raise CheckpointError(f"{path}: is a symlink; a save never writes one, refusing to follow it")
    try:
        with torch.serialization.safe_globals(list(allowed_globals())):
            return torch.load(path, map_location=map_location, mmap=mmap, weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        if found is None and "Unsupported global" not in str(e):
            raise CheckpointError(f"{path}: cannot be read ({_first_line(e)}): not a file a save wrote") from None
        what = f"`{found.group(1)}`" if found else "an object outside the allowed list"
        raise CheckpointError(f"{path}: refusing to load it: it asks to run or build {what}, which no checkpoint "
                              f"written by this project contains (a pickle can run code when it is loaded)") from None
    except Exception as e:  # noqa: BLE001 - any failure to parse the file is the file's: name it, one line
        if host_failure(e):
            raise
        raise CheckpointError(f"{path}: cannot be read ({type(e).__name__}: {_first_line(e)}): truncated, or not "
                              "a file a save wrote") from None


_HOST_ERRNOS = {errno.EIO, errno.ESTALE, errno.ENOMEM, errno.EACCES, errno.EPERM, errno.ETIMEDOUT, errno.ENOTCONN,
                errno.EHOSTDOWN, errno.EHOSTUNREACH, errno.ECONNRESET}  # EINVAL, ENOENT...: the file's own fault


def host_failure(e: BaseException) -> bool:
    """Whether a failed read is the host's or the disk's (memory short, an I/O error, a stale NFS handle), not the
    file's: such an error keeps its own message instead of becoming "truncated, or not a file a save wrote"."""
    if isinstance(e, MemoryError) or (isinstance(e, OSError) and e.errno in _HOST_ERRNOS):
        return True
    return isinstance(e, RuntimeError) and any(m in str(e) for m in ("can't allocate memory", "out of memory"))


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [""])[0][:160]


_WRITTEN: dict[str, tuple[int, str]] = {}  # absolute path -> (bytes, sha256) of what this process saved
_LOCK = threading.Lock()  # _WRITTEN is filled by the background writer and read by the commit
_LOCAL = threading.local()  # .deferred: the list `save` appends to inside `deferred()` on this thread


class _HashingFile:
    """A write-only file that hashes what passes through it (torch.save writes its zip sequentially)."""

    def __init__(self, f: Any):
        self.f, self.sha, self.size = f, hashlib.sha256(), 0

    def write(self, data: bytes) -> int:
        self.sha.update(data)
        self.size += len(data)
        return self.f.write(data)

    def flush(self) -> None:
        self.f.flush()


@contextlib.contextmanager
def deferred() -> Iterator[list[tuple[Any, str]]]:
    """Within this block, `save` on this thread writes nothing: it copies what it is given to host memory (so
    training may change the originals at once) and appends (copy, path) to the yielded list, for `write_all`
    on another thread. This is how a save blocks training only for the copy (pretrain/checkpoint/commit.py).
    The copies land in `STAGING`'s buffers: the caller must not enter this block again before the previous
    block's jobs are written (CheckpointManager.save waits for the save in flight first)."""
    _LOCAL.deferred = []
    STAGING.begin()
    try:
        yield _LOCAL.deferred
    finally:
        _LOCAL.deferred = None
        STAGING.end()


def write_all(jobs: list[tuple[Any, str]]) -> None:
    for obj, path in jobs:
        save(obj, path)
        progress()  # a long save the loop waits for is not a hang (pretrain/train/watchdog.py)


class Staging:
    """The host memory a background save copies the state into, kept from one save to the next.

    Why keep it: a fresh host allocation of the whole state at every save pays its page faults again each time
    (the allocator hands large blocks back to the OS when they are freed), and on CUDA a device-to-host copy
    into pageable memory runs at a fraction of the rate of one into pinned memory, which is slow to allocate.
    So the buffers stay, pinned when the state is on a GPU (pageable where the host refuses to lock more): the
    steady cost is one more copy of this rank's state in host memory, exactly its bytes (`host_bytes`; the
    planner's `checkpoint:` line estimates it), which every save needed anyway while it was written.

    Buffers are handed out in request order: a save copies the same tree in the same order each time, so its
    i-th storage lands in the buffer the previous save's i-th storage used when the sizes agree, and in a new
    one when they do not (a tree that changed shape costs one allocation, never a wrong buffer)."""

    def __init__(self) -> None:
        self.buffers: list[HostBuffer] = []
        self.taken = 0
        self.from_device = False

    @property
    def host_bytes(self) -> int:
        return sum(b.storage.nbytes() for b in self.buffers)

    def begin(self) -> None:
        self.taken, self.from_device = 0, False

    def copy(self, storage: torch.UntypedStorage) -> torch.UntypedStorage:
        from_gpu = storage.device.type == "cuda"
        i, self.taken = self.taken, self.taken + 1
        if not (i < len(self.buffers) and self.buffers[i].storage.nbytes() == storage.nbytes()):
            self.buffers[i:i + 1] = [HostBuffer(storage.nbytes(), pin=from_gpu)]
        buf = self.buffers[i]
        pinned = from_gpu and buf.pinned
        buf.storage.copy_(storage, non_blocking=pinned)  # into pinned memory: asynchronous, ordered after the step
        self.from_device |= pinned
        return buf.storage

    def end(self) -> None:
        """The copies are complete (the writer thread may read them); buffers this save did not use are freed."""
        del self.buffers[self.taken:]
        if self.from_device:
            torch.cuda.synchronize()


class HostBuffer:
    """`nbytes` of host memory, page-locked in place when `pin`, unlocked when dropped.

    Why not `torch.empty(pin_memory=True)`: that goes through torch's caching host allocator, which rounds every
    block up to a power of two and keeps freed blocks: a 1b ZeRO-2 state of about 17 GB would lock about 28 GiB,
    for every rank of a node. Here the buffer is an anonymous mapping of its own (page-aligned, sharing no page
    with another allocation, so two registrations never overlap) locked with the driver's cuMemHostRegister:
    exactly its bytes, rounded up to a page. The driver API is used rather than the runtime's cudaHostRegister
    because a failed runtime call leaves its error pending on the thread, and torch's next kernel launch would
    raise it; a driver call's failure is only its return value. Where the host refuses (memory short, no CUDA
    context on this thread) the buffer stays pageable: the copy is slower, the save the same. Unlocking when
    the buffer is dropped leaves any view of it valid (pageable again)."""

    def __init__(self, nbytes: int, *, pin: bool):
        self.context = None
        if pin and nbytes > 0:
            self._pages = mmap.mmap(-1, nbytes)  # kept alive by the storage below (it exports this buffer)
            self.storage = torch.frombuffer(self._pages, dtype=torch.uint8).untyped_storage()
            self.context = _pin(self.storage.data_ptr(), nbytes)
        else:
            self.storage = torch.empty(nbytes, dtype=torch.uint8).untyped_storage()

    @property
    def pinned(self) -> bool:
        return self.context is not None

    def __del__(self) -> None:
        if getattr(self, "context", None) is not None:
            _unpin(self.storage.data_ptr(), self.context)


_PORTABLE = 1  # CU_MEMHOSTREGISTER_PORTABLE: pinned for every CUDA context of the process


@functools.lru_cache(maxsize=1)
def _driver() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL("libcuda.so.1")
    except OSError:  # no NVIDIA driver on this host
        return None


def _pin(ptr: int, nbytes: int) -> ctypes.c_void_p | None:
    """Lock [ptr, ptr + nbytes) with the CUDA context current on this thread; that context, or None if refused."""
    cuda = _driver()
    if cuda is None:
        return None
    context = ctypes.c_void_p()
    if cuda.cuCtxGetCurrent(ctypes.byref(context)) != 0 or not context.value:
        return None
    ok = cuda.cuMemHostRegister_v2(ctypes.c_void_p(ptr), ctypes.c_size_t(nbytes), ctypes.c_uint(_PORTABLE)) == 0
    return context if ok else None


def _unpin(ptr: int, context: ctypes.c_void_p) -> None:
    """Unlock what _pin locked, from whatever thread drops the buffer (with the context it was locked in)."""
    cuda = _driver()
    if cuda is None or cuda.cuCtxPushCurrent_v2(context) != 0:
        return
    cuda.cuMemHostUnregister(ctypes.c_void_p(ptr))
    cuda.cuCtxPopCurrent_v2(ctypes.byref(ctypes.c_void_p()))


STAGING = Staging()


def host_copy(obj: Any, _storages: dict[tuple, Any] | None = None) -> Any:
    """A copy of a state tree that shares no memory with it, but shares storage within itself as the original
    does: each storage is copied to host memory once (into `STAGING`'s buffers) and every tensor on it becomes
    the same view of the copy (tied weights, views of a flat buffer), so the file written from it is the one
    torch.save would write from the original. Containers are rebuilt; other leaves (DeepSpeed's loss scaler,
    NumPy RNG state, numbers) deep-copied."""
    storages = {} if _storages is None else _storages
    if isinstance(obj, torch.Tensor):
        t = obj.detach()
        storage = t.untyped_storage()
        key = (storage.device, storage.data_ptr(), storage.nbytes())
        if key not in storages:
            storages[key] = STAGING.copy(storage)
        return torch.empty(0, dtype=t.dtype).set_(storages[key], t.storage_offset(), t.size(), t.stride())
    if isinstance(obj, dict):
        return type(obj)((k, host_copy(v, storages)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)) and type(obj) in (list, tuple):
        return type(obj)(host_copy(v, storages) for v in obj)
    return copy.deepcopy(obj)


def save(obj: Any, path: str | Path) -> None:
    """torch.save, hashing the bytes as they are written; the digest waits for `take_digests`. Inside
    `deferred()`: a host copy, queued."""
    path = os.path.abspath(path)
    queue = getattr(_LOCAL, "deferred", None)
    if queue is not None:
        queue.append((host_copy(obj), path))
        return
    with open(path, "wb") as f:
        out = _HashingFile(f)
        try:
            torch.save(obj, out)
        except Exception as e:  # a failed write surfaces as torch's zip writer's RuntimeError, the OSError inside
            raise os_error(e) or e
        f.flush()
        os.fsync(f.fileno())
    with _LOCK:
        _WRITTEN[path] = (out.size, out.sha.hexdigest())


def os_error(e: BaseException | None) -> OSError | None:
    """The OSError (disk full, quota, read-only, ...) at the root of `e`, if one is: libraries wrap it."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, OSError):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


def take_digests(root: str | Path) -> dict[str, tuple[int, str]]:
    """(bytes, sha256) of the files this process saved under `root`, by path relative to it; forgotten here."""
    prefix = os.path.abspath(root) + os.sep
    with _LOCK:
        mine = {p: d for p, d in _WRITTEN.items() if p.startswith(prefix)}
        for p in mine:
            del _WRITTEN[p]
    return {Path(p).relative_to(prefix).as_posix(): d for p, d in mine.items()}


def adopt_deepspeed(ds_engine: Any) -> None:
    """Make a DeepSpeed engine write its checkpoint files through `save` (hashed) and read them through `load`
    (restricted). Its torch checkpoint engine calls torch.save / torch.load(..., weights_only=False); only those
    two methods are replaced, on this engine's instance."""
    ds_engine.checkpoint_engine.load = lambda path, map_location=None: load(path, map_location)
    ds_engine.checkpoint_engine.save = lambda state_dict, path: save(state_dict, path)
