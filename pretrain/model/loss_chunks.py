"""How many tokens one chunk of the output head's loss holds (pretrain.kernels.linear_cross_entropy).

Torch-free, so that `pretrain plan` and `--dry-run` size the head's memory by the same rule the head runs.
"""
from __future__ import annotations

# Working memory of one chunk: its (c x V_local) logits and what the loss makes of them. 512 MiB keeps a chunk's
# matmuls large (2093 tokens at a 128k vocabulary in bf16 on the fused path) and the head's transient memory small.
CHUNK_BYTES = 512 * 1024**2


def bytes_per_logit(itemsize: int, in_place: bool) -> int:
    """Working bytes per logit entry of a chunk whose logits have `itemsize` bytes: the logits alone when the loss
    writes its gradient over them (the Triton kernel); else the logits, their fp32 copy and, below fp32, the
    gradient cast back to the logits' dtype (plain PyTorch and megatron-core's vocab-parallel steps)."""
    if in_place:
        return itemsize
    return 4 if itemsize == 4 else 4 + 2 * itemsize


def chunk_tokens(n_tokens: int, vocab_local: int, logit_bytes: int, override: int = 0) -> int:
    """Tokens per chunk: `override` (model.loss_chunk_tokens) when set, else as many as fit CHUNK_BYTES."""
    if override > 0:
        return min(n_tokens, override)
    return max(1, min(n_tokens, CHUNK_BYTES // (vocab_local * logit_bytes)))
