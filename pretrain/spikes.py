"""Loss-spike detection: is this step's loss or grad norm far above the recent ones, for several steps in a row?

PaLM (Chowdhery et al. 2022, section 5.1) saw ~20 loss spikes in its largest run and recovered from each by hand:
restart from a checkpoint ~100 steps before the spike and skip 200-500 batches. `train.spike` automates that:
this module decides that a spike happened; pretrain/rollback.py restores and skips.

The test is a robust z-score, one-sided (only a rise is a spike):

    z = (x - median) / max(1.4826 * MAD, 1% of |median|)

over the last `window` calm steps, for x = loss and x = grad norm; a step is suspicious when the loss's z exceeds
`threshold` or the grad norm's exceeds `grad_norm_threshold` (higher by default: grad-norm spikes that leave the
loss alone are frequent in LLM training, clipping absorbs them, and a rollback for one would only waste the steps
since the checkpoint), and `confirm_steps` suspicious steps in a row confirm a spike. The median and the MAD
(1.4826 * MAD estimates the standard deviation of normal noise) ignore the outliers a mean and a standard deviation
would absorb; the 1% floor keeps a flat plateau (MAD near 0) from calling noise a spike. Suspicious steps never enter
the history, so a spike cannot raise its own baseline. Non-finite steps are the non-finite guard's business
(`train.max_nonfinite_steps`) and are ignored here.

Every rank computes the same verdicts from the same numbers (the step's loss and grad norm are global); the loop
still agrees on a confirmed spike in the collective it runs each step anyway (pretrain/train.py), and the state
is saved in every checkpoint, so a resumed run judges the next steps exactly as an uninterrupted one.
"""
from __future__ import annotations

import math
import statistics
from collections import deque
from dataclasses import dataclass
from typing import Any

from pretrain.config import SpikeSection

MAD_TO_SIGMA = 1.4826  # the MAD of a normal distribution is 0.6745 sigma
RELATIVE_FLOOR = 0.01


@dataclass(frozen=True)
class Verdict:
    loss_z: float | None       # None while the window fills, and for a skipped step
    grad_norm_z: float | None
    suspicious: bool
    confirmed: bool            # `confirm_steps` suspicious steps in a row end here
    first: int | None = None   # the first step of the suspicious run (the spike window starts there)

    def why(self, cfg: SpikeSection) -> str:
        if self.loss_z is not None and self.loss_z > cfg.threshold:
            return f"loss robust z {self.loss_z:.1f} > {cfg.threshold:g}"
        return f"grad norm robust z {self.grad_norm_z:.1f} > {cfg.grad_norm_threshold:g}"


def robust_z(x: float, history: list[float]) -> float:
    median = statistics.median(history)
    mad = statistics.median(abs(v - median) for v in history)
    return (x - median) / max(MAD_TO_SIGMA * mad, RELATIVE_FLOOR * abs(median), 1e-12)


class SpikeDetector:
    def __init__(self, cfg: SpikeSection) -> None:
        self.cfg = cfg
        self.losses: deque[float] = deque(maxlen=cfg.window)
        self.norms: deque[float] = deque(maxlen=cfg.window)
        self.run: list[int] = []  # the steps of the current suspicious run

    @property
    def calm(self) -> bool:
        """No suspicious step pending: a periodic checkpoint may be taken (one inside a spike would be discarded)."""
        return not self.run

    def observe(self, step: int, loss: float, grad_norm: float, skipped: bool) -> Verdict:
        if skipped or not (math.isfinite(loss) and math.isfinite(grad_norm)):
            return Verdict(None, None, False, False)
        if len(self.losses) < self.cfg.window:
            self.losses.append(loss)
            self.norms.append(grad_norm)
            return Verdict(None, None, False, False)
        cfg = self.cfg
        loss_z, norm_z = robust_z(loss, list(self.losses)), robust_z(grad_norm, list(self.norms))
        if loss_z <= cfg.threshold and not (cfg.grad_norm_threshold and norm_z > cfg.grad_norm_threshold):
            self.run = []
            self.losses.append(loss)
            self.norms.append(grad_norm)
            return Verdict(loss_z, norm_z, False, False)
        self.run.append(step)
        first = self.run[0]
        confirmed = len(self.run) >= cfg.confirm_steps
        if confirmed:
            self.run = []
        return Verdict(loss_z, norm_z, True, confirmed, first)

    def state_dict(self) -> dict[str, Any]:
        return {"losses": list(self.losses), "norms": list(self.norms), "run": list(self.run)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.losses = deque(state["losses"], maxlen=self.cfg.window)
        self.norms = deque(state["norms"], maxlen=self.cfg.window)
        self.run = list(state["run"])
