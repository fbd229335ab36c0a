"""The training loop's one handle on checkpoints: where a launch starts from, what a save writes, when it is done.

torchtitan's CheckpointManager is the model. `pretrain train` makes one per launch; it
- holds `<checkpoint.dir>/run.lock` for the launch (run_lock.py) and clears the debris of killed saves;
- chooses where the launch starts (resume.py: fresh, `model.init_from`, this layout's checkpoint or another
  layout's, re-sliced) and restores the engine and the loader from it;
- saves a step: DeepSpeed's state under `model/` (the engine's tag), every rank's loader cursor and RNG, the
  config, meta (the resolved run, the MLflow run id) and a copy of the tokenizer, committed as commit.py says,
  in the background unless `checkpoint.background` is off (at most one save in flight);
- waits for the save in flight before the next one, a stop, and the end.
"""
from __future__ import annotations

import dataclasses
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable

from data_pipeline.tokenizer import tokenizer_files
from pretrain.checkpoint import commit
from pretrain.checkpoint.commit import PendingSave
from pretrain.checkpoint.resume import EngineFiles, StartPoint, Stateful, choose_start, restore, saved_run
from pretrain.checkpoint.run_lock import RunLock, RunLocked
from pretrain.config import Config
from pretrain.console import say
from pretrain.run.distributed import DistEnv
from pretrain.run.paths import TOKENIZER_DIR
from pretrain.run.resolved import ResolvedRun, TokenizerFacts


class CheckpointManager:
    def __init__(self, cfg: Config, run: ResolvedRun, env: DistEnv):
        """Take the run lock (every rank raises RunLocked when another live launch holds it)."""
        self.cfg, self.run, self.env = cfg, run, env
        self.dir = Path(cfg.checkpoint.dir)
        self.in_flight: PendingSave | None = None
        self._unreported: list[PendingSave] = []  # committed and waited for, not yet handed to `committed`
        self.load_s: float | None = None  # a resume: choosing + verifying + loading its checkpoint (restore)
        self._choose_s = 0.0
        self._on_commit: Callable[[], None] | None = None
        self._engine: EngineFiles | None = None
        self._loader: Stateful | None = None
        self._extra: Callable[[], dict[str, Any]] = dict
        self._lock: RunLock | None = None
        refusal = None
        if env.rank == 0:
            lock = RunLock(self.dir)
            try:
                if note := lock.acquire():
                    say(note)
                self._lock = lock
                commit.remove_stale_temps(self.dir)
            except RunLocked as e:
                refusal = str(e)
            except OSError as e:  # e.g. checkpoint.dir cannot be created: every rank must hear it, not wait
                refusal = f"{self.dir}: {e.strerror or e} ({e.filename})"
                if self._lock is not None:
                    self._lock.release()
                    self._lock = None
        if env.all_reduce_max(1.0 if refusal else 0.0) > 0:
            raise RunLocked(refusal or f"{self.dir}: refused on rank 0 (see its log)")

    def start_point(self) -> StartPoint:
        """Where this launch starts; a bad checkpoint fails here, before anything is built."""
        started = time.monotonic()
        begin = choose_start(self.cfg, self.run, self.env)
        self._choose_s = time.monotonic() - started  # verifying the checkpoint: part of a resume's load time
        return begin

    def track(self, engine: EngineFiles, loader: Stateful, extra: Callable[[], dict[str, Any]] = dict) -> None:
        """What every save writes, registered once: the engine's files, and in each rank's file its loader cursor,
        its RNG states and `extra()` (more of this rank's state, JSON types: the spike detector's history)."""
        self._engine, self._loader, self._extra = engine, loader, extra

    def restore(self, begin: StartPoint) -> commit.Loaded | None:
        """The tracked engine and loader hold the state of the start point; what it held (None: nothing to
        restore). The rest of a rank file is the caller's to read back (`Loaded.rank_state`). A resume's time
        (choosing and verifying the checkpoint, loading engine and loader, re-slicing included; not building the
        engine) is `load_s`."""
        started = time.monotonic()
        loaded = restore(begin, self.env, self._engine, self._loader)
        self.load_s = self._choose_s + time.monotonic() - started if loaded is not None else None
        return loaded

    def rewindable(self, step_dir: Path) -> bool:
        """Whether `rewind` can load `step_dir` into the live engine: only a checkpoint of this layout can (one of
        another layout, from before a resume that re-sliced it, is re-sliced only when an engine is built)."""
        return saved_run(step_dir, self.run) is None

    def rewind(self, step_dir: Path, engine: EngineFiles) -> commit.Loaded:
        """Back to a committed checkpoint of this run and layout (collective): weights, optimizer state, step and
        RNG; the loader is left where it is (a spike rollback skips the data read since)."""
        self.wait()
        return commit.load(step_dir, self.env, load_model=engine.load)

    def save(self, step: int, mlflow_run_id: str | None, on_commit: Callable[[], None] | None = None) -> None:
        """Start committing step_<step>/ of the tracked state (collective), after the save in flight, if any, is
        done. `on_commit` runs on this thread once it is committed (at the next `wait`): MLflow gets the steps it
        covers only then."""
        self.wait()
        self._on_commit = on_commit
        env, run, engine = self.env, self.run, self._engine

        def save_model(d: Path) -> None:
            engine.save(d)
            if env.rank == 0:
                copy_tokenizer(run.tokenizer, d)

        meta = commit.Meta(step=step, mlflow_run_id=mlflow_run_id,
                           tokenizer=dataclasses.asdict(run.tokenizer) if run.tokenizer else {},
                           layout=dataclasses.asdict(run.layout), resolved=run.to_dict())
        rank_state = {"loader": self._loader.state_dict(), **self._extra()}
        parts = dict(save_model=save_model, rank_state=rank_state, meta=meta,
                     config_yaml=self.cfg.to_yaml(), keep=self.cfg.checkpoint.keep)
        if self.cfg.checkpoint.background:
            self.in_flight = commit.save_in_background(self.dir, step, env, env.side, report=True, **parts)
            return
        started = time.monotonic()
        path = commit.save(self.dir, step, env, **parts)
        self.in_flight = PendingSave.done(path, time.monotonic() - started, step,
                                          commit.step_bytes(path) if env.rank == 0 else None)
        if env.rank == 0:
            say(f"{path.name} committed: {self.in_flight.summary()}")

    def wait(self) -> PendingSave | None:
        """Block until the save in flight is committed (CheckpointWriteError if it failed); it, or None. The time
        spent waiting counts as training held up by that save (`PendingSave.blocked_s`)."""
        done, self.in_flight = self.in_flight, None
        on_commit, self._on_commit = self._on_commit, None
        if done is not None:
            started = time.monotonic()
            done.wait()
            done.waited_s += time.monotonic() - started
            if not done.reported:
                self._unreported.append(done)
            if on_commit is not None:
                on_commit()
        return done

    def committed(self) -> PendingSave | None:
        """The oldest save that has committed and was not handed out yet, or None: what the step log records (its
        timings and size are known only once it commits, steps after it started). At most one per call. Never
        blocks and never raises: a save that failed is raised by `wait`, on every rank alike."""
        for save in [*self._unreported, self.in_flight]:
            if save is not None and not save.reported and save.committed():
                save.reported = True
                self._unreported = [s for s in self._unreported if s is not save]
                return save
        return None

    def abandon(self, timeout_s: float = 60.0) -> None:
        """After a failure: give the save in flight a bounded time to end (its errors are moot now), so the
        process groups are not torn down under the writer's collectives."""
        done, self.in_flight, self._on_commit = self.in_flight, None, None
        if done is not None:
            try:
                done.future.result(timeout=timeout_s)
            except Exception:  # noqa: BLE001 - a timeout or the save's own failure: the run is failing anyway
                pass

    def close(self) -> None:
        if self._lock is not None:
            self._lock.release()


def copy_tokenizer(tokenizer: TokenizerFacts | None, dest: Path) -> None:
    """Put the tokenizer files inside the checkpoint (a few MB) so it is self-contained for generate/export.
    `resolve_run` made the path absolute and refused to start without the files; if they vanished since, the
    checkpoint is still written (losing the run's progress would be worse) and the log says what is missing."""
    src = Path(tokenizer.path) if tokenizer and tokenizer.path else None
    if src is None or not src.exists():
        say(f"WARNING: tokenizer {src} is gone; {dest} holds no {TOKENIZER_DIR}/ copy")
        return

    out = dest / TOKENIZER_DIR
    out.mkdir()
    for f in tokenizer_files(str(src)):
        shutil.copy2(f, out / os.path.basename(f))
