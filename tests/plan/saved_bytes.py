"""Measures activation memory as autograd sees it: the bytes of every tensor saved for backward, live at once.

`torch.autograd.graph.saved_tensors_hooks` hands each saved tensor to `pack`; the packed handle lives exactly as
long as autograd keeps the tensor (it is dropped when the backward that needs it has run), so counting handles
in `pack` and uncounting them when they are garbage-collected gives the live saved bytes at every moment, and
their peak over a step. Tensors are counted once per storage (a view saved twice, or an input saved by three
linears, is one allocation). Parameters and other persistent tensors (the RoPE table) are not activations: their
storages are excluded.

Selective recompute (pretrain/model/recompute.py) keeps the outputs of matmuls, attention and collectives in
torch.utils.checkpoint's own cache, not through saved-tensor hooks: while active, SavedBytes also follows each
checkpointed region's cache for as long as the region lives (weakly: a region is freed after its backward) and
counts the tensors still in it (once per storage, beside the hooked ones), updating the peak as each is kept.
"""
from __future__ import annotations

import weakref
from typing import Iterable

import torch
from torch.utils._pytree import tree_leaves

from pretrain.model import recompute, transformer


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
        self._regions: list[weakref.ref] = []  # selective recompute's per-region cache holders
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    @property
    def now(self) -> int:
        return self.hooked + self._cached_bytes()

    def _cached_tensors(self) -> dict[int, int]:
        """{storage pointer: bytes} of the tensors selective recompute still keeps, not counted otherwise."""
        found: dict[int, int] = {}
        for region in self._regions:
            mode = region()
            for entries in (mode.storage.values() if mode is not None else ()):
                for leaf in tree_leaves(list(entries.values())):
                    t = getattr(leaf, "val", None)  # a kept output; consumed or recomputed entries hold none
                    if isinstance(t, torch.Tensor):
                        found[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return {p: n for p, n in found.items() if p not in self.live and p not in self.skip}

    def _cached_bytes(self) -> int:
        return sum(self._cached_tensors().values())

    def _selective_context(self):
        forward_mode, recompute_mode = self._original_context()
        self._regions.append(weakref.ref(recompute_mode))  # the region holds it, with the cache, until backward
        return forward_mode, recompute_mode

    def _policy(self, ctx, op, *args, **kwargs):
        """The recompute policy, and the peak as each kept output joins the cache."""
        policy = self._original_policy(ctx, op, *args, **kwargs)
        if policy == recompute.CheckpointPolicy.MUST_SAVE and not ctx.is_recompute:
            cached = self._cached_tensors()
            new = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tree_leaves(ctx.op_output)
                   if isinstance(t, torch.Tensor)}
            extra = sum(n for p, n in new.items() if p not in cached and p not in self.live and p not in self.skip)
            self.peak = max(self.peak, self.hooked + sum(cached.values()) + extra)
        return policy

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
        self._original_context, self._original_policy = transformer.selective_context, recompute._policy
        transformer.selective_context, recompute._policy = self._selective_context, self._policy
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)
        transformer.selective_context, recompute._policy = self._original_context, self._original_policy
        self.peak = max(self.peak, self.now)
