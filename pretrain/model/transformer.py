"""A LLaMA-style decoder: RMSNorm, rotary positions, grouped-query attention, SwiGLU, pre-norm residual blocks;
optionally Qwen3's QK-norm (RMSNorm of each head's queries and keys before RoPE).

Architecture only. What kind of linear/embedding each projection is (whole, or a megatron-core tensor-parallel
shard) is decided by the `LayerFactory` passed in; the numerics (RMSNorm, RoPE, SwiGLU, cross-entropy) go
through `pretrain.kernels`, the single dispatch point for fused kernels. Shapes in comments:
B batch, T tokens, D model dim, H query heads on this rank, K key/value heads on this rank, hd head dim.

Parameter names follow Meta's LLaMA (`tok_embeddings`, `layers.<i>.attention.wq`, `feed_forward.w1`,
`attention_norm`, ...), and `layers` is a ModuleDict keyed by the block index, so a pipeline stage that holds
blocks 4..7 still calls them `layers.4`..`layers.7`: checkpoint keys and Hugging Face export are a name map.
"""
from __future__ import annotations

import functools
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint, noop_context_fn

from pretrain import kernels
from pretrain.model.args import ModelArgs
from pretrain.model.documents import Documents
from pretrain.model.layers import REFERENCE, LayerFactory
from pretrain.model.recompute import selective_context

Checkpointing = Literal["none", "full", "selective"]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.rms_norm(x, self.weight, self.eps)


@functools.lru_cache(maxsize=8)
def _rope_table(head_dim: int, max_len: int, theta: float, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin for every position up to max_len, kept in fp32 outside the module so bf16 casts never touch them."""
    return kernels.rope_cache(head_dim, max_len, theta, device=torch.device(device))


class KVCache:
    """Keys and values of the positions seen so far, per block, for incremental decoding.

    Stored after RoPE, with K (not H) heads: grouped-query attention's memory saving is the point.
    """

    def __init__(self, n_layers: int, batch: int, max_len: int, n_kv_heads: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        shape = (batch, max_len, n_kv_heads, head_dim)
        self.max_len = max_len
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]

    def update(self, layer: int, start_pos: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Write k, v (B, T, K, hd) at start_pos; return all keys/values up to start_pos + T."""
        end = start_pos + k.shape[1]
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; asked to write up to {end}")
        self.k[layer][:, start_pos:end] = k
        self.v[layer][:, start_pos:end] = v
        return self.k[layer][:, :end], self.v[layer][:, :end]


def causal_mask(T: int, S: int, start_pos: int, device: torch.device) -> torch.Tensor | None:
    """Boolean (1, 1, T, S) mask for T queries at positions start_pos.. over S cached keys, True = may attend;
    None when plain causal `is_causal` is exact (no cache offset)."""
    if start_pos == 0:
        return None
    q_pos = torch.arange(start_pos, start_pos + T, device=device)
    k_pos = torch.arange(S, device=device)
    return (k_pos[None, :] <= q_pos[:, None])[None, None]


class CoreAttention(nn.Module):
    """Rotary positions, then grouped-query attention of queries over keys: (B, T, H, hd) q and (B, T, K, hd) k, v
    -> (B, T, H, hd). No parameters: the seam where context parallelism (pretrain/parallel/context.py) exchanges
    sequence for heads, so that this always sees whole sequences (positions start_pos.., documents whole)."""

    def __init__(self, args: ModelArgs, layer_id: int):
        super().__init__()
        self.layer_id = layer_id
        self.head_dim = args.head_dim
        self.rope_theta = args.rope_theta
        self.max_seq_len = args.max_seq_len

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, docs: Documents | None = None,
                start_pos: int = 0, cache: KVCache | None = None) -> torch.Tensor:
        B, T, H, _ = q.shape
        if start_pos + T > self.max_seq_len:
            raise ValueError(f"position {start_pos + T} is beyond model.max_seq_len={self.max_seq_len}")
        cos, sin = _rope_table(self.head_dim, self.max_seq_len, self.rope_theta, str(q.device))
        cos, sin = cos[start_pos:start_pos + T], sin[start_pos:start_pos + T]
        q, k = kernels.apply_rope(q, cos, sin), kernels.apply_rope(k, cos, sin)

        if docs is not None:  # a packed training row: attend within each document only
            if cache is not None or start_pos != 0:
                raise ValueError("document masking applies to whole training sequences, not cached decoding")
            return kernels.document_attention(q, k, v, docs)  # (B, T, H, hd)
        if cache is not None:
            k, v = cache.update(self.layer_id, start_pos, k, v)  # (B, S, K, hd), S = start_pos + T
        S, K = k.shape[1], k.shape[2]
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, hd), (B, K, S, hd)
        mask = causal_mask(T, S, start_pos, q.device)
        # Each group of H/K query heads reads the same key/value head (query head h uses kv head h // (H/K)).
        # SDPA does the grouping itself, so K/V (and what autograd saves of them) stay K heads wide; expanding
        # them to H heads first (repeat_interleave) would save H/K times the bytes for the backward pass.
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and T > 1,
                                           enable_gqa=H != K)
        return y.transpose(1, 2)  # (B, T, H, hd)


class Attention(nn.Module):
    """Grouped-query self-attention: H query heads share K key/value heads (each TP rank holds H/tp and K/tp).

    With `qk_norm` each head's query and key are RMS-normalised over hd before RoPE (Qwen3's QK-norm), one weight
    of hd for all query heads and one for all key heads. It acts within a head, so a TP rank normalises the heads
    it holds and both weights are whole (replicated) on every rank."""

    def __init__(self, args: ModelArgs, factory: LayerFactory, layer_id: int):
        super().__init__()
        self.layer_id = layer_id
        self.n_heads = args.n_heads // factory.tp
        self.n_kv_heads = args.kv_heads // factory.tp
        self.head_dim = args.head_dim
        self.wq = factory.column_linear(args.dim, args.n_heads * args.head_dim)
        self.wk = factory.column_linear(args.dim, args.kv_heads * args.head_dim)
        self.wv = factory.column_linear(args.dim, args.kv_heads * args.head_dim)
        self.wo = factory.row_linear(args.n_heads * args.head_dim, args.dim)
        if args.qk_norm:
            self.q_norm = RMSNorm(args.head_dim, args.norm_eps)
            self.k_norm = RMSNorm(args.head_dim, args.norm_eps)
        self.qk_norm = args.qk_norm
        self.core = CoreAttention(args, layer_id)

    def forward(self, x: torch.Tensor, docs: Documents | None = None, start_pos: int = 0,
                cache: KVCache | None = None) -> torch.Tensor:
        q = self.wq(x)
        # Read B, T from the projection, not from x: under sequence parallelism x holds T/tp tokens.
        B, T = q.shape[:2]
        q = q.view(B, T, self.n_heads, self.head_dim)  # (B, T, H, hd)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim)  # (B, T, K, hd)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim)  # (B, T, K, hd)
        if self.qk_norm:  # q / rms(q) * g_q per head, the same for k: before RoPE, which preserves the norm
            q, k = self.q_norm(q), self.k_norm(k)
        y = self.core(q, k, v, docs, start_pos, cache)  # (B, T, H, hd)
        return self.wo(y.reshape(B, T, self.n_heads * self.head_dim))


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x); w1/w3 split the hidden width over TP, w2 sums it back."""

    def __init__(self, dim: int, hidden_dim: int, factory: LayerFactory):
        super().__init__()
        self.w1 = factory.column_linear(dim, hidden_dim)
        self.w3 = factory.column_linear(dim, hidden_dim)
        self.w2 = factory.row_linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(kernels.swiglu(self.w1(x), self.w3(x)))


class TransformerBlock(nn.Module):
    """Pre-norm residual block: h = x + attn(norm(x)); out = h + ffn(norm(h))."""

    def __init__(self, args: ModelArgs, factory: LayerFactory, layer_id: int,
                 checkpointing: Checkpointing = "none"):
        super().__init__()
        self.checkpointing = checkpointing
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.attention = Attention(args, factory, layer_id)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        self.feed_forward = FeedForward(args.dim, args.hidden_dim, factory)

    def _body(self, x, docs, start_pos, cache):
        h = x + self.attention(self.attention_norm(x), docs, start_pos, cache)
        return h + self.feed_forward(self.ffn_norm(h))

    def forward(self, x: torch.Tensor, docs: Documents | None = None, start_pos: int = 0,
                cache: KVCache | None = None) -> torch.Tensor:
        if self.checkpointing == "none" or cache is not None or not torch.is_grad_enabled():
            return self._body(x, docs, start_pos, cache)
        # full: keep the block's input, re-run the block in backward; selective: also keep the matmul, attention
        # and collective outputs, so backward recomputes only the cheap ops between them (model/recompute.py).
        context = selective_context if self.checkpointing == "selective" else noop_context_fn
        return checkpoint(self._body, x, docs, start_pos, None, use_reentrant=False, context_fn=context)


class Transformer(nn.Module):
    """tokens (B, T) -> logits (B, T, V_local), or the mean next-token loss over B*T targets when they are given
    (or, for evaluation, each target's log-probability and whether it was the most likely token).

    `z_loss`: the training loss's z-loss coefficient (`train.z_loss`; the head adds it in training mode only)."""

    def __init__(self, args: ModelArgs, factory: LayerFactory = REFERENCE, checkpointing: Checkpointing = "none",
                 z_loss: float = 0.0):
        super().__init__()
        if args.vocab_size is None:
            raise ValueError("ModelArgs.vocab_size is None: resolve it (and pad it) before building the model")
        self.args = args
        self.factory = factory
        self.tok_embeddings = factory.vocab_embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleDict({str(i): TransformerBlock(args, factory, i, checkpointing)
                                     for i in range(args.n_layers)})
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = factory.vocab_head(args.dim, args.vocab_size, z_loss)
        if args.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor | None = None,
                docs: Documents | torch.Tensor | None = None, start_pos: int = 0,
                cache: KVCache | None = None, scores: bool = False) -> torch.Tensor:
        """docs: where packed documents begin (document masking); the loader's doc_ids (B, T) are taken too.
        scores: with targets, each target's (log p, is the argmax) as (B, T, 2) instead of the mean loss."""
        if isinstance(docs, torch.Tensor):
            docs = Documents.from_ids(docs)
        h = self.tok_embeddings(tokens)  # (B, T, D)
        for layer in self.layers.values():
            h = layer(h, docs, start_pos, cache)
        # logits (B, T, V_local), or with targets the mean next-token loss (the logits never held whole)
        return self.output(self.norm(h), targets, scores) if scores else self.output(self.norm(h), targets)

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        p = next(self.parameters())
        attn = self.layers["0"].attention
        return KVCache(self.args.n_layers, batch, max_len, attn.n_kv_heads, attn.head_dim, p.dtype, p.device)
