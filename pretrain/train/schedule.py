"""Learning-rate schedules: linear warmup, then cosine, linear, WSD (warmup-stable-decay) or constant.

A pure function of the step so that a resumed run needs no scheduler state to land on the same lr.
"""
from __future__ import annotations

import math

from pretrain.config import OptimSection


def lr_at(step: int, optim: OptimSection, max_steps: int) -> float:
    """Learning rate for optimizer step `step` (0-based) of a `max_steps` run."""
    peak, floor = optim.lr, optim.lr * optim.min_lr_ratio
    warmup = min(optim.warmup_steps, max_steps)
    if step < warmup:
        return peak * (step + 1) / warmup
    if optim.schedule == "constant":
        return peak
    if optim.schedule == "wsd":
        decay_steps = max(1, int(round(optim.decay_fraction * max_steps)))
        decay_start = max(warmup, max_steps - decay_steps)
        if step < decay_start:
            return peak
        progress = min(1.0, (step - decay_start) / max(1, max_steps - decay_start))
        return peak - (peak - floor) * progress
    progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
    if optim.schedule == "linear":
        return peak - (peak - floor) * progress
    return floor + 0.5 * (peak - floor) * (1.0 + math.cos(math.pi * progress))
