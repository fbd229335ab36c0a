"""Profiles on demand: `train.profile: [START, STEPS]` records steps START..START+STEPS-1 with the torch profiler on
every rank and writes one Chrome/Perfetto trace per rank to `<checkpoint.dir>/profiles/` (open it at
https://ui.perfetto.dev or chrome://tracing); rank 0 logs the folder to the MLflow run and the run's last lines
name it. On CUDA, with a profile asked for, the allocator also records its history from the start, so a step that
runs out of memory leaves `oom_rank<r>.pickle` (a snapshot for https://pytorch.org/memory_viz) before the error
goes on.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from pretrain.console import say
from pretrain.run.distributed import DistEnv
from pretrain.run.paths import PROFILE_DIR
from pretrain.telemetry.tracking import Tracker
from pretrain.train.hooks import Observer, StepReport


class StepProfiler(Observer):
    def __init__(self, window: tuple[int, int] | None, run_dir: Path, env: DistEnv, tracker: Tracker | None = None):
        self.first, self.last = (window[0], window[0] + window[1] - 1) if window else (0, -1)
        self.dir = run_dir / PROFILE_DIR
        self.env, self.rank, self.tracker = env, env.rank, tracker
        self._prof: Any = None
        self.traces: list[Path] = []
        if self.enabled and torch.cuda.is_available():  # from the start: an OOM before the window is caught too
            torch.cuda.memory._record_memory_history(max_entries=100_000)

    @property
    def enabled(self) -> bool:
        return self.last >= self.first

    def before_step(self, step: int) -> None:
        if step != self.first:
            return
        activities = [torch.profiler.ProfilerActivity.CPU]
        if torch.cuda.is_available():
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        self._prof = torch.profiler.profile(activities=activities, record_shapes=True)
        self._prof.start()

    def after_step(self, report: StepReport) -> None:
        """Collective at the window's last step: every rank's trace is written before rank 0 says where."""
        if self._finish(report.step) is None:
            return
        self.env.barrier()
        if self.rank == 0:
            say(f"profile of steps {self.first}-{self.last}: {self.dir} (one trace per rank)")
            if self.tracker:
                self.tracker.artifact_dir(self.dir, PROFILE_DIR)

    def _finish(self, step: int) -> Path | None:
        """After step `step` (and its evaluation, if any): the trace's path once the window is done."""
        if self._prof is None or step != self.last:
            return None
        self._prof.stop()
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / f"trace_steps{self.first}-{self.last}_rank{self.rank}.json"
        self._prof.export_chrome_trace(str(path))
        self._prof = None
        self.traces.append(path)
        return path

    def out_of_memory(self, error: BaseException) -> Path | None:
        """On CUDA, after an out-of-memory error in a step: the allocator's snapshot, if history was recorded."""
        if not (torch.cuda.is_available() and isinstance(error, torch.cuda.OutOfMemoryError) and self.enabled):
            return None
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / f"oom_rank{self.rank}.pickle"
        torch.cuda.memory._dump_snapshot(str(path))
        return path
