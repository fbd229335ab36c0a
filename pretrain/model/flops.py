"""What one trained token costs: the FLOPs behind MFU (the step log), the planner's step time and the benchmarks."""
from __future__ import annotations

from pretrain.model.args import ModelArgs


def matmul_params(args: ModelArgs, vocab_size: int) -> int:
    """N of the FLOPs formula: block weights + final norm + the output head (V x D), no embedding table."""
    return args.num_params(vocab_size, embeddings=False) + vocab_size * args.dim


def flops_per_token(args: ModelArgs, seq_len: int, vocab_size: int, causal: bool = False) -> float:
    """Model FLOPs per trained token, forward + backward (PaLM's 6N + 12LHQT; `causal`: Megatron's 6N + 6LHQT).

    `vocab_size` is the vocabulary the head really computes (the padded one)."""
    attention = (6.0 if causal else 12.0) * args.n_layers * args.n_heads * args.head_dim * seq_len
    return 6.0 * matmul_params(args, vocab_size) + attention
