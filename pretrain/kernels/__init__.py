"""The numerical primitives the model names, and the one place that decides how they run.

Each op has an eager PyTorch reference (the ground truth every fused path is parity-tested against). On CUDA, with
`use_fused(True)`, a fused Triton kernel may replace it; on CPU the eager path always runs. The output head's loss
(`linear_cross_entropy`) runs in token chunks on every device, so no (tokens x vocab) logits are ever held whole.
"""
from __future__ import annotations

import importlib
import logging
from types import ModuleType
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from pretrain.kernels.linear_cross_entropy import EAGER, ChunkLoss, ZLoss
from pretrain.kernels.linear_cross_entropy import linear_cross_entropy as _linear_cross_entropy
from pretrain.kernels.linear_cross_entropy import token_scores as _token_scores
from pretrain.kernels import varlen_attention

if TYPE_CHECKING:
    from pretrain.model.documents import Documents

_KERNELS: dict[str, ModuleType] = {}  # op -> its Triton module while fused kernels are on; {} when off
_FUSED_DEVICE = "cuda"  # the device type whose tensors the Triton kernels take
_LOSS_CHUNK = 0  # tokens per chunk of the output head's loss; 0: sized by model.loss_chunks
_OPS = ("rmsnorm", "rope", "swiglu", "cross_entropy")
log = logging.getLogger(__name__)


def use_fused(enabled: bool) -> None:
    """Switch fused kernels on or off for the whole process (the model config's `fused_kernels`).

    The Triton modules are imported here, once, before any model code runs: the ops below only look them up in a
    dict. An import at call time (importlib) is code Dynamo will not trace, so a compiled block would break its
    graph at every norm, RoPE and SwiGLU (and a selective-recompute region would fall back to eager)."""
    global _KERNELS
    _KERNELS = import_kernels() if enabled else {}


def import_kernels() -> dict[str, ModuleType]:
    """Each op's Triton module (TRITON_INTERPRET is read when they are first imported), or {} without triton."""
    try:
        importlib.import_module("triton")
    except ImportError:
        log.warning("fused kernels requested but triton is not importable; using the eager ops")
        return {}
    return {op: importlib.import_module(f"pretrain.kernels.triton_{op}") for op in _OPS}


def use_loss_chunk(tokens: int) -> None:
    """Tokens per chunk of the output head + loss for the whole process (the model config's `loss_chunk_tokens`)."""
    global _LOSS_CHUNK
    _LOSS_CHUNK = tokens


def fused_enabled(x: torch.Tensor) -> bool:
    return bool(_KERNELS) and x.device.type == _FUSED_DEVICE


def _fused(name: str) -> ModuleType:
    return _KERNELS[name]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x / rms(x) * weight, computed in fp32 whatever the input dtype (LLaMA's RMSNorm)."""
    if fused_enabled(x):
        return _fused("rmsnorm").rms_norm(x, weight, eps)
    xf = x.float()
    out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return out.type_as(x) * weight


def rope_cache(head_dim: int, seq_len: int, theta: float, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables of shape (seq_len, head_dim) in fp32.

    Rotate-half convention (GPT-NeoX / Hugging Face): dimension i pairs with i + head_dim/2. Meta's reference
    pairs adjacent dims instead; choosing HF's layout makes Hugging Face export a pure renaming of weights.
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    t = torch.arange(seq_len, device=device, dtype=torch.float32)
    freqs = torch.outer(t, inv_freq)  # (T, hd/2)
    emb = torch.cat([freqs, freqs], dim=-1)  # (T, hd)
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, T, H, hd) by position; cos/sin are (T, hd) or (B, T, hd) for per-sample positions."""
    if fused_enabled(x):
        return _fused("rope").apply_rope(x, cos, sin)
    if cos.dim() == 2:
        cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    else:
        cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    xf = x.float()
    half = xf.shape[-1] // 2
    rotated = torch.cat([-xf[..., half:], xf[..., :half]], dim=-1)
    return (xf * cos + rotated * sin).type_as(x)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """SiLU(gate) * up: the SwiGLU feed-forward's nonlinearity."""
    if fused_enabled(gate):
        return _fused("swiglu").swiglu(gate, up)
    return F.silu(gate) * up


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Mean next-token loss over non-ignored targets, computed in fp32. logits (N, V), targets (N,)."""
    if fused_enabled(logits):
        return _fused("cross_entropy").cross_entropy(logits, targets, ignore_index)
    return F.cross_entropy(logits.float(), targets, ignore_index=ignore_index)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         chunk_loss: ChunkLoss | None = None, ignore_index: int = -100,
                         z_loss: ZLoss | None = None) -> torch.Tensor:
    """Mean next-token loss of logits = hidden @ weight.T, computed chunk by chunk (never all logits at once).
    hidden (N, D), weight (V_local, D), targets (N,). `chunk_loss`: how a chunk's softmax is taken (the tensor-
    parallel build passes megatron-core's); default the Triton kernel on CUDA with fused kernels on, else eager.
    `z_loss`: add its coefficient x lse^2 per target, and record the term in it."""
    if chunk_loss is None:
        chunk_loss = _fused("cross_entropy").chunk_loss if fused_enabled(hidden) else EAGER
    return _linear_cross_entropy(hidden, weight, targets, chunk_loss, ignore_index, _LOSS_CHUNK, z_loss)


def token_scores(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_loss: ChunkLoss | None = None,
                 vocab_start: int = 0, group: object | None = None) -> torch.Tensor:
    """(N, 2): log p(target) and whether it is the most likely token, in the same chunks and with the same softmax
    as `linear_cross_entropy` (evaluation; see pretrain/kernels/linear_cross_entropy.py)."""
    if chunk_loss is None:
        chunk_loss = _fused("cross_entropy").chunk_loss if fused_enabled(hidden) else EAGER
    return _token_scores(hidden, weight, targets, chunk_loss, vocab_start, group, _LOSS_CHUNK)


def document_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, docs: Documents) -> torch.Tensor:
    """Causal attention that stays inside each packed document. q (B, T, H, hd), k/v (B, T, K, hd) -> (B, T, H, hd).

    CUDA in bf16/fp16: varlen flash attention over the document boundaries (no mask tensor, memory linear in T).
    Elsewhere, the reference: SDPA with the dense (B, 1, T, T) mask."""
    if varlen_attention.available(q):
        return varlen_attention.causal_varlen_attention(q, k, v, docs.cu_seqlens, docs.max_len)
    y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                       attn_mask=docs.dense_mask(), enable_gqa=q.shape[2] != k.shape[2])
    return y.transpose(1, 2)
