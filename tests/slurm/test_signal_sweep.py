"""The signal contract over a job's whole life, on the real 2-node cluster: `scancel --signal=USR1 --batch` (what
SLURM sends ahead of a time limit or a preemption) at start-up, in the early steps, at a step that saves and
evaluates, at the last step, and after `done:`; and SIGTERM to the step's processes in the early steps. Every job
ends COMPLETED (directly, or after its requeue), and its per-step losses are the uninterrupted run's, bit for bit.

The jobs (conftest.py: signal_sweep, the points in slurm_helpers.SWEEP_POINTS) are submitted together and run two
at a time (each takes one CPU per node); each is signalled as it reaches its point. The "save and eval" job is also
test_real_training.py's preempted run.
"""
from __future__ import annotations

import pytest

from slurm_helpers import SWEEP_POINTS, SWEEP_STEPS, Watched, read_jsonl, step_losses

pytestmark = [pytest.mark.slurm, pytest.mark.slow]


def test_a_usr1_anywhere_in_a_jobs_life_ends_completed_with_the_uninterrupted_losses(
        signal_sweep: dict[str, Watched], debug_reference: dict[int, float]) -> None:
    for point in SWEEP_POINTS:
        job = signal_sweep[point.name]
        info, log = job.info, job.log()
        assert job.signalled, f"{point.name}: the job ended before its point was reached"
        assert info["JobState"] == "COMPLETED", f"{point.name}: {info['JobState']} ({info.get('ExitCode')})\n" \
                                                f"{log[-4000:]}"
        requeued = info["Restarts"] != "0"
        assert point.requeued in (None, requeued), f"{point.name}: Restarts={info['Restarts']}\n{log[-3000:]}"
        assert step_losses(job.run) == debug_reference, f"{point.name}: losses differ from the uninterrupted run"
        segments = read_jsonl(job.run / "segments.jsonl")
        assert segments[-1]["end_step"] == SWEEP_STEPS and len(segments) == 1 + requeued, (point.name, segments)
        print(f"{point.name}: COMPLETED, restarts {info['Restarts']}, segments "
              f"{[(s['start_step'], s['end_step']) for s in segments]}")
