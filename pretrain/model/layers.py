"""What the model asks for, and the plain single-device answer.

The LLaMA code never says `nn.Linear`: it asks a `LayerFactory` for "a column-parallel linear" (output features
split over tensor-parallel ranks), "a row-parallel linear" (input features split, outputs summed), "a
vocab-parallel embedding" and "a vocab-parallel head" (which also computes the loss, so that the whole logits
never exist: pretrain.kernels.linear_cross_entropy). This file gives the reference answer (everything whole,
tp = 1); `pretrain/parallel/tensor.py` gives megatron-core's. One model file, two builds, and the parity tests
compare them (megatron-core's gpt_layer_specs idea, without its machinery).
"""
from __future__ import annotations

import torch
from torch import nn

from pretrain import kernels


class LayerFactory:
    """The reference build: plain PyTorch modules, tp = 1. Subclasses decide differently in one place."""

    tp: int = 1
    tp_rank: int = 0
    # True when the residual stream is split along the sequence between TP ranks (megatron sequence parallel).
    sequence_parallel: bool = False

    def column_linear(self, in_features: int, out_features: int) -> nn.Module:
        return nn.Linear(in_features, out_features, bias=False)

    def row_linear(self, in_features: int, out_features: int) -> nn.Module:
        return nn.Linear(in_features, out_features, bias=False)

    def vocab_embedding(self, vocab_size: int, dim: int) -> nn.Module:
        return nn.Embedding(vocab_size, dim)

    def vocab_head(self, dim: int, vocab_size: int, z_loss: float = 0.0) -> nn.Module:
        return VocabHead(dim, vocab_size, z_loss)

    def full_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits over the whole (padded) vocabulary, for sampling."""
        return logits


REFERENCE = LayerFactory()


class VocabHead(nn.Linear):
    """The output projection D -> V. head(h) gives logits (B, T, V); head(h, targets) gives the mean next-token
    loss over the B*T targets, computed in token chunks (the logits are never held whole); head(h, targets,
    scores=True) gives each target's (log p, is the argmax) as (B, T, 2), for evaluation.

    The loss lives in the head's forward, not after it, so that whatever wraps forward sees the weight in use:
    DeepSpeed ZeRO-3 gathers a module's parameters in its forward hooks.

    `z_loss` > 0 (`train.z_loss`): in training mode the loss is the cross-entropy + z_loss x lse^2 (the term
    recorded in `self.z_loss` for the step's metric); in eval mode (validation, the spike look-ahead) it is the
    plain cross-entropy, and scores never include it."""

    def __init__(self, dim: int, vocab_size: int, z_loss: float = 0.0):
        super().__init__(dim, vocab_size, bias=False)
        self.z_loss = kernels.ZLoss(z_loss) if z_loss > 0 else None

    def forward(self, h: torch.Tensor, targets: torch.Tensor | None = None, scores: bool = False) -> torch.Tensor:
        if targets is None:
            return super().forward(h)
        if scores:
            return kernels.token_scores(h.flatten(0, 1), self.weight, targets.flatten()).view(*targets.shape, 2)
        return kernels.linear_cross_entropy(h.flatten(0, 1), self.weight, targets.flatten(),
                                            z_loss=self.z_loss if self.training else None)
