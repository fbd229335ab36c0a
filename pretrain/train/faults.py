"""Fault injection for tests (documented, environment only, off by default).

PRETRAIN_INJECT_NONFINITE="5,6" makes the loss of optimizer steps 5 and 6 NaN inside the engine's forward, so the
engine's non-finite guard -- not ours -- is what gets exercised; PRETRAIN_INJECT_SIGKILL="before_step:31",
"after_rollback" or "during_lookahead" (once a rollback's look-ahead judged a batch spike-level,
pretrain/train/rollback.py) kills every rank with SIGKILL there (a node lost at the worst moment: the resume must
reach the same state); PRETRAIN_INJECT_STEP_SECONDS="0.5" sleeps that long before every step (a slow step: a
signal a test sends when a step is logged still lands mid-run, however fast this machine trains; the numbers are
unchanged); PRETRAIN_INJECT_STALL="1:3:60" makes rank 1 sleep 60 s before step 3 (a stalled rank: the others
wait for it in the step's first collective, and the hang watchdog must say which rank it is);
PRETRAIN_INJECT_SLOW_RANK="1:0.5" makes every step of rank 1 spend 0.5 s more before its first forward (a
straggler: pretrain/train/stragglers.py must name it).
"""
from __future__ import annotations

import os
import signal
import time
from typing import Any

from pretrain.train.engine import Engine
from pretrain.train.hooks import Observer


class Faults(Observer):
    """The hooks above, read from the environment once per launch."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.nonfinite = {int(s) for s in os.environ.get("PRETRAIN_INJECT_NONFINITE", "").split(",") if s.strip()}
        self.kill = os.environ.get("PRETRAIN_INJECT_SIGKILL", "")
        self.step_s = float(os.environ.get("PRETRAIN_INJECT_STEP_SECONDS", "0") or 0)
        stall = os.environ.get("PRETRAIN_INJECT_STALL", "")
        rank, step, seconds = stall.split(":") if stall else ("-1", "0", "0")
        self.stall = (int(step), float(seconds)) if int(rank) == engine.env.rank else None
        slow = os.environ.get("PRETRAIN_INJECT_SLOW_RANK", "")
        if slow and int(slow.split(":")[0]) == engine.env.rank:
            engine.slow_s = float(slow.split(":")[1])

    def before_step(self, step: int) -> None:
        if self.step_s > 0:
            time.sleep(self.step_s)
        if self.stall is not None and step == self.stall[0]:
            time.sleep(self.stall[1])
        if self.kill == f"before_step:{step}":
            os.kill(os.getpid(), signal.SIGKILL)
        if step in self.nonfinite:
            self.engine.inject_nonfinite()  # this step's loss becomes NaN inside the engine

    def after_rollback(self, record: dict[str, Any]) -> None:
        if self.kill == "after_rollback":
            os.kill(os.getpid(), signal.SIGKILL)
