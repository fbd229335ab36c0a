"""Shape of a LLaMA-style transformer, and the named flavors every config refers to.

The flavors live next to the model (torchtitan's habit) so that "what is a 7B" is answered in one place.
Shapes follow the published LLaMA-2 / LLaMA-3 models; `debug` is the tiny model the tests and `make demo` train
on CPU.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass


@dataclass(frozen=True)
class ModelArgs:
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    # Grouped-query attention: n_heads query heads share n_kv_heads key/value heads (None = n_heads, i.e. MHA).
    n_kv_heads: int | None = None
    # None = take it from the tokenizer (the shard manifest) at build time.
    vocab_size: int | None = None
    # FFN width: LLaMA's rule (2/3 * 4 * dim, times ffn_dim_multiplier, rounded up to multiple_of)
    # unless ffn_hidden_dim pins it.
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    ffn_hidden_dim: int | None = None
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_seq_len: int = 4096
    tie_embeddings: bool = False
    # RMSNorm over each head's queries and keys before RoPE (Qwen3's QK-norm): the attention logits q.k stay bounded
    # whatever the projections' scale grows to, which keeps large-lr and long runs from attention-logit blow-ups.
    # Two weights of head_dim per block, shared by all heads.
    qk_norm: bool = False
    # Std of the normal init; output projections (wo, w2) are further scaled by 1/sqrt(2 * n_layers).
    init_std: float = 0.02

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def hidden_dim(self) -> int:
        if self.ffn_hidden_dim is not None:
            return self.ffn_hidden_dim
        hidden = int(2 * 4 * self.dim / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * math.ceil(hidden / self.multiple_of)

    def replace(self, **changes) -> "ModelArgs":
        return dataclasses.replace(self, **changes)

    def num_params(self, vocab_size: int | None = None, embeddings: bool = True) -> int:
        """Exact parameter count of the model built from these args (vocab as given, e.g. padded)."""
        v = vocab_size or self.vocab_size or 0
        hd = self.head_dim
        attn = self.dim * (self.n_heads * hd) + 2 * self.dim * (self.kv_heads * hd) + (self.n_heads * hd) * self.dim
        ffn = 3 * self.dim * self.hidden_dim
        norms = 2 * self.dim + (2 * hd if self.qk_norm else 0)
        blocks = self.n_layers * (attn + ffn + norms)
        emb = v * self.dim if embeddings else 0
        head = 0 if (self.tie_embeddings or not embeddings) else v * self.dim
        return blocks + emb + head + self.dim  # + final norm


FLAVORS: dict[str, ModelArgs] = {
    "debug": ModelArgs(dim=64, n_layers=4, n_heads=4, n_kv_heads=2, multiple_of=32, max_seq_len=512),
    "125m": ModelArgs(dim=768, n_layers=12, n_heads=12, max_seq_len=2048),
    "350m": ModelArgs(dim=1024, n_layers=24, n_heads=16, max_seq_len=2048),
    # LLaMA-3.2 1B / 3B shapes (tied embeddings, GQA, theta 500k).
    "1b": ModelArgs(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, ffn_hidden_dim=8192, rope_theta=500000.0,
                    tie_embeddings=True, max_seq_len=8192),
    "3b": ModelArgs(dim=3072, n_layers=28, n_heads=24, n_kv_heads=8, ffn_hidden_dim=8192, rope_theta=500000.0,
                    tie_embeddings=True, max_seq_len=8192),
    # LLaMA-2 7B / 13B.
    "7b": ModelArgs(dim=4096, n_layers=32, n_heads=32),
    "13b": ModelArgs(dim=5120, n_layers=40, n_heads=40),
    # LLaMA-3 8B / 70B.
    "8b": ModelArgs(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, multiple_of=1024, ffn_dim_multiplier=1.3,
                    rope_theta=500000.0, max_seq_len=8192),
    "70b": ModelArgs(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, multiple_of=4096, ffn_dim_multiplier=1.3,
                     rope_theta=500000.0, max_seq_len=8192),
}

# The vocabulary each published model was trained with (LLaMA-2's sentencepiece 32000, LLaMA-3's tiktoken 128256).
# The model takes its vocabulary from the tokenizer; only `pretrain plan`, before any data exists, assumes these.
PUBLISHED_VOCAB: dict[str, tuple[int, str]] = {
    "1b": (128256, "LLaMA-3"), "3b": (128256, "LLaMA-3"), "8b": (128256, "LLaMA-3"), "70b": (128256, "LLaMA-3"),
    "7b": (32000, "LLaMA-2"), "13b": (32000, "LLaMA-2"),
}
