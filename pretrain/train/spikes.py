"""Loss-spike detection: is this step's loss or grad norm far above the recent ones, for several steps in a row?

PaLM (Chowdhery et al. 2022, section 5.1) saw ~20 loss spikes in its largest run and recovered from each by hand:
restart from a checkpoint ~100 steps before the spike and skip 200-500 batches. `train.spike` automates that:
this module decides that a spike happened; pretrain/train/rollback.py restores and skips.

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

The first `window` steps are judged too, once `MIN_HISTORY` calm steps exist (the smallest `window` the config
allows): the loss against the most recent `MIN_HISTORY` calm steps until the window is full. Not against all of
them: the first steps are where the loss falls fastest, and a median over all of them lags far above the current
loss, with a spread the fall itself inflates (the debug model on the demo corpus: to be flagged, a step's loss
must exceed 10.0 at step 20 and 15.9 at step 40 against all of its history, 8.1 and 5.0 against the last 8
steps). On a falling curve the recent median still lies above a clean step's loss: in six clean debug runs (up to
1,000 steps, three learning rates, 1 and 2 ranks) no loss z before the window filled exceeded 1.8. In the very
first steps junk is hardly more surprising than clean text to a model that has learned little, so no loss
statistic tells them apart there. The grad norm is judged only once the window is full: early on it jumps by large
factors with clean data (those runs: 2-4x around step 12, robust z up to 27 against the steps before), and
clipping bounds what an unjudged grad-norm spike can do; junk data shows in the loss.

After a rollback, `loss_z` judges forward-only losses of the batches ahead against the restored history (the same
statistic, pretrain/train/rollback.py), so one rollback gets past a poisoned stretch longer than the spike window.

Every rank computes the same verdicts from the same numbers (the step's loss and grad norm are global); the loop
still agrees on a confirmed spike in the collective it runs each step anyway (pretrain/train/loop.py), and the state
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
MIN_HISTORY = 8  # calm steps before the loss is judged: the smallest `window` the config accepts


@dataclass(frozen=True)
class Verdict:
    loss_z: float | None       # None before MIN_HISTORY calm steps, and for a skipped step
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
        loss_z = self.loss_z(loss)
        if loss_z is None:
            self.losses.append(loss)
            self.norms.append(grad_norm)
            return Verdict(None, None, False, False)
        cfg = self.cfg
        norm_z = robust_z(grad_norm, list(self.norms))  # reported from the start, judged once the window is full
        norm_spike = len(self.norms) >= cfg.window and 0 < cfg.grad_norm_threshold < norm_z
        if loss_z <= cfg.threshold and not norm_spike:
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

    @property
    def min_history(self) -> int:
        return min(self.cfg.window, MIN_HISTORY)

    def loss_z(self, loss: float) -> float | None:
        """The robust z of a loss against the calm history (its last `min_history` steps while the window fills);
        None while it holds fewer than `min_history` steps (too few to tell noise from a spike)."""
        n = len(self.losses)
        if n < self.min_history:
            return None
        history = list(self.losses)
        return robust_z(loss, history if n >= self.cfg.window else history[-self.min_history:])

    def state_dict(self) -> dict[str, Any]:
        return {"losses": list(self.losses), "norms": list(self.norms), "run": list(self.run)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.losses = deque(state["losses"], maxlen=self.cfg.window)
        self.norms = deque(state["norms"], maxlen=self.cfg.window)
        self.run = list(state["run"])
