"""The moments of the loop an observer can hang on, and what it is told at each (OLMo-core's callbacks, smaller).

Observers watch and record: the step log, the profiler, the system-metrics sampler, the tests' fault hooks. What
the run does next (stop, roll back, save) is decided in the loop itself, where it can be read."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:  # the engine imports DeepSpeed; observers need only the names
    from pretrain.checkpoint.commit import PendingSave
    from pretrain.train.data import HeldOutScore
    from pretrain.train.engine import StepResult
    from pretrain.train.stragglers import Straggler
    from pretrain.train.spikes import Verdict


@dataclass
class StepReport:
    """One optimizer step as the observers see it: the engine's result (loss, lr, grad norm, skipped), the held-out
    loss when evaluated, the spike detector's verdict, the rollbacks so far, the downstream scores when
    `eval.tasks` ran at this step, and on rank 0 at logged steps the slowest rank."""
    step: int
    result: StepResult
    val: HeldOutScore | None
    verdict: Verdict
    rollbacks: int
    downstream: dict[str, float] | None = None
    straggler: Straggler | None = None  # rank 0, on measured steps: the slowest rank


class Observer:
    """Every hook does nothing unless a subclass says otherwise."""

    def before_step(self, step: int) -> None:
        """Before step `step` runs."""

    def after_step(self, report: StepReport) -> None:
        """After the step and its evaluation; collective when an observer makes it so (every rank calls it)."""

    def after_save(self, step: int) -> None:
        """A save of step `step` has started (it commits in the background)."""

    def after_commit(self, save: PendingSave) -> None:
        """A save has committed (seen before the next step's `after_step`, or at the end): its timings and size."""

    def after_rollback(self, record: dict[str, Any]) -> None:
        """The run went back to `record["restored_step"]` (train/rollback.py's record)."""

    def close(self) -> None:
        """The launch ends, however it ends."""


class Observers(Observer):
    """The observers of one launch, called in order."""

    def __init__(self, observers: Sequence[Observer]) -> None:
        self.all = list(observers)

    def before_step(self, step: int) -> None:
        for o in self.all:
            o.before_step(step)

    def after_step(self, report: StepReport) -> None:
        for o in self.all:
            o.after_step(report)

    def after_save(self, step: int) -> None:
        for o in self.all:
            o.after_save(step)

    def after_commit(self, save: PendingSave) -> None:
        for o in self.all:
            o.after_commit(save)

    def after_rollback(self, record: dict[str, Any]) -> None:
        for o in self.all:
            o.after_rollback(record)

    def close(self) -> None:
        """Every observer's close, in order (each reports its own failures: the error that ended the launch, if
        any, is the one to raise)."""
        for o in self.all:
            o.close()
