"""Where the documents of a packed micro-batch begin and end, in the two forms attention kernels take.

The loader packs documents back to back into fixed-length rows and numbers them within each row (`doc_ids`,
0, 0, 1, 1, 1, 2, ...). With `model.document_mask` a token attends only to earlier tokens of its own document.
The dense reference turns that into a (B, 1, T, T) boolean mask for SDPA, which costs memory quadratic in T and
takes SDPA off its flash kernel; varlen flash attention takes the same boundaries as offsets into the flattened
B*T tokens (`cu_seqlens`) and stays linear in T. Both are built here, once per micro-batch, on the host when the
ids are still there (the engine builds them from the loader's CPU tensors, so no GPU value is read back).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Documents:
    ids: torch.Tensor  # (B, T) document number of each token, non-decreasing along a row
    cu_seqlens: torch.Tensor  # (N + 1,) int32: where each of the N documents starts in the B*T flat tokens, then B*T
    max_len: int  # the longest document's length

    @staticmethod
    def from_ids(ids: torch.Tensor) -> Documents:
        """A document is a run of equal ids within one row; a row boundary always ends one."""
        B, T = ids.shape
        starts = torch.ones_like(ids, dtype=torch.bool)
        starts[:, 1:] = ids[:, 1:] != ids[:, :-1]
        first = starts.flatten().nonzero().flatten()
        cu_seqlens = torch.cat([first, first.new_tensor([B * T])]).to(torch.int32)
        return Documents(ids, cu_seqlens, int((cu_seqlens[1:] - cu_seqlens[:-1]).max()))

    def to(self, device: torch.device | str) -> Documents:
        return Documents(self.ids.to(device, non_blocking=True), self.cu_seqlens.to(device, non_blocking=True),
                         self.max_len)

    def dense_mask(self) -> torch.Tensor:
        """(B, 1, T, T) boolean, True = may attend: causal and within the same document."""
        T = self.ids.shape[1]
        pos = torch.arange(T, device=self.ids.device)
        causal = pos[None, :] <= pos[:, None]  # (T, T)
        same_doc = self.ids[:, :, None] == self.ids[:, None, :]  # (B, T, T)
        return (causal & same_doc)[:, None]
