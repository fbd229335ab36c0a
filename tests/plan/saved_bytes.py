"""Measures activation memory as autograd sees it: the bytes of every tensor saved for backward, live at once.

`torch.autograd.graph.saved_tensors_hooks` hands each saved tensor to `pack`; the packed handle lives exactly as
long as autograd keeps the tensor (it is dropped when the backward that needs it has run), so counting handles
in `pack` and uncounting them when they are garbage-collected gives the live saved bytes at every moment, and
their peak over a step. Tensors are counted once per storage (a view saved twice, or an input saved by three
linears, is one allocation). Parameters and other persistent tensors (the RoPE table) are not activations: their
storages are excluded.

Selective recompute (pretrain/model/recompute.py) keeps the outputs of matmuls, attention and collectives in
torch.utils.checkpoint's own cache, not through saved-tensor hooks: while active, SavedBytes also captures each
checkpointed region's cache and counts the tensors still in it (once per storage, beside the hooked ones).
"""
from __future__ import annotations

import weakref
from typing import Iterable

import torch
from torch.utils._pytree import tree_leaves

from pretrain.model import transformer


class _Handle:
    __slots__ = ("tensor", "__weakref__")

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor


class SavedBytes:
    """with SavedBytes(exclude=model.parameters()) as m: forward / backward; then m.peak, m.now (bytes)."""

    def __init__(self, exclude: Iterable[torch.Tensor] = ()):
        self.skip = {t.untyped_storage().data_ptr() for t in exclude}
        self.live: dict[int, list[int]] = {}  # storage pointer -> [handles alive, bytes]
        self.hooked = self.peak = 0
        self._caches: list[dict] = []  # selective recompute's per-region caches
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    @property
    def now(self) -> int:
        return self.hooked + self._cached_bytes()

    def _cached_bytes(self) -> int:
        seen, total = set(self.live) | self.skip, 0
        for cache in self._caches:
            for entries in cache.values():
                for leaf in tree_leaves(list(entries.values())):
                    t = getattr(leaf, "val", None)  # a kept output; consumed or recomputed entries hold none
                    if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in seen:
                        seen.add(t.untyped_storage().data_ptr())
                        total += t.untyped_storage().nbytes()
        return total

    def _selective_context(self):
        forward_mode, recompute_mode = self._original_context()
        self._caches.append(forward_mode.storage)
        return forward_mode, recompute_mode

    def _pack(self, t: torch.Tensor):
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr in self.skip or storage.nbytes() == 0:
            return t
        entry = self.live.get(ptr)
        if entry is None:
            self.live[ptr] = [1, storage.nbytes()]
            self.hooked += storage.nbytes()
            self.peak = max(self.peak, self.now)
        else:
            entry[0] += 1
        handle = _Handle(t)
        weakref.finalize(handle, self._release, ptr)
        return handle

    def _release(self, ptr: int) -> None:
        entry = self.live[ptr]
        entry[0] -= 1
        if entry[0] == 0:
            self.hooked -= entry[1]
            del self.live[ptr]

    @staticmethod
    def _unpack(h):
        return h.tensor if isinstance(h, _Handle) else h

    def __enter__(self) -> "SavedBytes":
        self._original_context = transformer.selective_context
        transformer.selective_context = self._selective_context
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)
        transformer.selective_context = self._original_context
        self.peak = max(self.peak, self.now)
