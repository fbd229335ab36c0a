"""Sampling from the reference model with a KV cache: greedy, temperature, top-k and nucleus (top-p).

With the cache, the prompt is run once ("prefill") and every new token costs one position of attention against
the cached keys/values; without it (`use_cache=False`) the whole sequence is recomputed each step, which is the
slow ground truth the cache is tested against.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from pretrain.model.transformer import Transformer


@dataclass(frozen=True)
class Sampling:
    temperature: float = 1.0  # 0 = greedy (argmax)
    top_k: int | None = None  # keep the k most likely tokens
    top_p: float | None = None  # keep the smallest set whose probability mass reaches p

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k is not None and self.top_k <= 0:
            raise ValueError(f"top_k must be > 0, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


def sample_next(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None) -> int:
    """One token id from the last position's logits (V,)."""
    if sampling.temperature == 0:
        return int(torch.argmax(logits))
    logits = logits.float() / sampling.temperature
    if sampling.top_k is not None:
        kth = torch.topk(logits, min(sampling.top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if sampling.top_p is not None:
        sorted_probs, order = torch.sort(probs, descending=True)
        # Drop a token when the mass before it already reaches p (so the most likely token always stays).
        drop = (torch.cumsum(sorted_probs, dim=-1) - sorted_probs) >= sampling.top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(0, order, sorted_probs)
        probs = probs / probs.sum()
    return int(torch.multinomial(probs, 1, generator=generator))


@torch.no_grad()
def generate(model: Transformer, prompt: list[int], max_new_tokens: int, sampling: Sampling = Sampling(0.0),
             eos_id: int | None = None, seed: int | None = None, use_cache: bool = True,
             vocab_size: int | None = None) -> list[int]:
    """Continue `prompt` by up to `max_new_tokens` tokens (fewer if eos_id is produced; eos is included).

    `vocab_size` (the tokenizer's, unpadded) keeps the padding rows of a padded vocabulary from being sampled.
    """
    if not prompt:
        raise ValueError("generate needs a non-empty prompt")
    max_len = len(prompt) + max_new_tokens
    if max_len > model.args.max_seq_len:
        raise ValueError(f"prompt + new tokens = {max_len} exceeds model.max_seq_len={model.args.max_seq_len}")
    model.eval()
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    tokens = list(prompt)
    cache = model.new_cache(1, max_len) if use_cache else None
    pos = 0  # tokens already in the cache
    for _ in range(max_new_tokens):
        if cache is not None:
            inp = torch.tensor([tokens[pos:]], device=device)
            logits = model(inp, start_pos=pos, cache=cache)
            pos = len(tokens)
        else:
            logits = model(torch.tensor([tokens], device=device))
        last = model.factory.full_logits(logits)[0, -1]
        if vocab_size is not None:
            last = last[:vocab_size]
        nxt = sample_next(last.cpu(), sampling, generator)
        tokens.append(nxt)
        if eos_id is not None and nxt == eos_id:
            break
    return tokens[len(prompt):]
