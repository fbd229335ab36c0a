"""`pretrain train`: build, restore, loop, finish.

`train()` is the recipe. What a step means: `engine.train_step` consumes `grad_accum` micro-batches of
`micro_batch_size` sequences on every rank, averages the per-token loss over them and over DP, and takes one
optimizer step (or none, with `skipped=True`, when the loss or grad norm is not finite). Step numbers count
optimizer steps from 1. The loop decides what happens next (stop, roll back, save); observers (train/hooks.py)
record it. However a launch ends, the loop hands back an `Outcome` and one teardown acts on it.

Exit codes (pretrain/run/exits.py): 0 done; 42 stopped by SIGTERM/SIGUSR1/SIGINT after a committed checkpoint
(requeue me; a second SIGINT exits 130 at once, see train/signals.py); 3 needs a person: `train.max_nonfinite_steps`
non-finite steps in a row (nothing checkpointed from the bad streak), or a loss spike that `train.spike` could not
roll back (max_rollbacks used up, no checkpoint before it; train/rollback.py); 4 another rank died or stopped
answering (a collective failed or waited past `train.collective_timeout_s`); 5 a checkpoint could not be written
(disk full, quota, read-only: one line naming the cause and the last good checkpoint; the unfinished copy
removed); 43 no step for `train.hang_timeout_s` (every rank's stacks in <checkpoint.dir>/hangs/, written by
train/watchdog.py, which exits from its own thread); 2 bad config/data/checkpoint (one line on stderr). Fault
injection for tests: train/faults.py.
"""
from __future__ import annotations

import contextlib
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch.distributed as dist

from data_pipeline.loader import TokenLoader
from pretrain import checkpoint
from pretrain.checkpoint.manager import CheckpointManager
from pretrain.checkpoint.resume import StartPoint
from pretrain.config import Config, ConfigError
from pretrain.console import say
from pretrain.plan.fit import check_memory
from pretrain.run.distributed import DistEnv, init_distributed, lost_peer
from pretrain.run.exits import EXIT_LOST_PEER, EXIT_NEEDS_PERSON, EXIT_OK, EXIT_REQUEUE, EXIT_SAVE_FAILED
from pretrain.run.resolved import ResolvedRun, held_out_note, resolve_run
from pretrain.telemetry import metrics, model_registry
from pretrain.telemetry.tracking import Tracker, checkpoint_run_id, open_tracker, system_metrics
from pretrain.train.data import HeldOut, make_loader
from pretrain.train.engine import Engine, build_engine
from pretrain.train.faults import Faults
from pretrain.train.hooks import Observer, Observers, StepReport
from pretrain.train.profiling import StepProfiler
from pretrain.train.rollback import NeedsPerson, SpikeGuard
from pretrain.train.signals import StopRequest
from pretrain.train.step_log import StepLog, append_segment
from pretrain.train.stragglers import StragglerWatch
from pretrain.train.watchdog import HangWatchdog


class NonFiniteAbort(NeedsPerson):
    """Too many non-finite steps in a row: the run stops without checkpointing the bad streak."""


@dataclass
class Outcome:
    """How a launch ends, for the one teardown: the exit code, the line to say (rank 0's, or each rank's), the
    MLflow run's end (FAILED also drops the steps never checkpointed: the resumed run logs them) and whether the
    process groups can be closed (not after a lost peer: closing would wait on the rank that is gone)."""
    code: int
    step: int
    line: str | None = None
    each_rank: bool = False
    status: str = "FINISHED"
    close_groups: bool = True


@dataclass
class Prepared:
    """What a launch trains with, built and restored."""
    begin: StartPoint
    engine: Engine
    loader: TokenLoader
    held_out: HeldOut
    downstream: Any  # pretrain.eval.in_loop.DownstreamEval when eval.tasks is set, else None
    stragglers: StragglerWatch
    spikes: SpikeGuard
    start: int
    mlflow_run_id: str | None
    notes: list[str] = field(default_factory=list)


def train(cfg: Config, stop: StopRequest | None = None) -> int:
    """`stop`: handlers installed by the caller as early as possible (the CLI does it before importing torch)."""
    stop = stop or StopRequest().install()
    started = time.time()
    run = resolve_run(cfg, int(os.environ.get("WORLD_SIZE", 1)))
    check_memory(cfg, run)  # a shape this host cannot hold is refused before any group exists
    env = init_distributed(cfg, layout=run.layout)
    with _groups_closed_on_error(env):
        ckpt = CheckpointManager(cfg, run, env)  # holds the run lock: one launch per checkpoint.dir
    try:
        with _groups_closed_on_error(env):
            prep = prepare(cfg, run, env, ckpt)
        announce(cfg, run, env, prep)
        if stop.should_stop(env):  # preempted while starting: nothing new to save (a fresh start starts again)
            if env.rank == 0:
                append_segment(Path(cfg.checkpoint.dir), prep.start, prep.start, started)
            return finish(_requeue(stop, prep.start, "before the first step, nothing to save"), cfg, env, None,
                          Observers([]))
        return loop(cfg, run, env, ckpt, prep, stop)
    finally:
        ckpt.close()


def prepare(cfg: Config, run: ResolvedRun, env: DistEnv, ckpt: CheckpointManager) -> Prepared:
    """The start point first (a bad checkpoint fails before anything is built), then data, engine, restore."""
    begin = ckpt.start_point()
    loader = make_loader(cfg, run, env)
    held_out = HeldOut(cfg, run, env)  # built once: manifests read and batches taken at the first eval only
    engine = build_engine(cfg, env, run, begin.init)
    downstream = _downstream(cfg, run, env, engine)
    stragglers = StragglerWatch(env, cfg.train.log_every, cfg.train.straggler_ratio)
    env.apply_collective_timeout()  # DeepSpeed's own groups too (see DistEnv.apply_collective_timeout)
    spikes = SpikeGuard(cfg, env, ckpt)
    ckpt.track(engine, loader, extra=spikes.state)
    restored = ckpt.restore(begin)  # None: nothing to restore
    after_rollback = spikes.resumed(restored, loader)  # the detector's history; the data a rollback skipped
    start, run_id = (restored.step, restored.meta.mlflow_run_id) if restored else (0, None)
    return Prepared(begin, engine, loader, held_out, downstream, stragglers, spikes, start, run_id,
                    [n for n in (held_out_note(cfg, run), after_rollback) if n])


def announce(cfg: Config, run: ResolvedRun, env: DistEnv, prep: Prepared) -> None:
    """Rank 0: metrics.jsonl cut back to the start (steps past it are redone: never twice in the file), and what
    this launch is, in a line."""
    if env.rank != 0:
        return
    metrics.truncate_after(Path(cfg.checkpoint.dir), prep.start)
    lay = run.layout
    say(f"{prep.begin.describe(cfg.model.init_from)} at step {prep.start}; world {lay.world} = {lay.shape_text}, "
        f"ZeRO-{run.zero_stage}, global batch {lay.global_batch} x {run.seq_len} tokens")
    for note in prep.notes:
        say(note)


def loop(cfg: Config, run: ResolvedRun, env: DistEnv, ckpt: CheckpointManager, prep: Prepared,
         stop: StopRequest) -> int:
    """The observers hung on, the steps run, the outcome acted on."""
    history = metrics.read(Path(cfg.checkpoint.dir)) if env.rank == 0 else []  # for the MLflow backfill
    tracker = open_tracker(cfg, run, env.rank, resume_run_id=prep.mlflow_run_id, resume_step=prep.start,
                           history=history)
    log = StepLog(cfg, run, env, tracker, prep.start, load_s=ckpt.load_s)
    profiler = StepProfiler(cfg.train.profile, Path(cfg.checkpoint.dir), env, tracker)
    log.profiles = profiler.dir
    watchdog = HangWatchdog(Path(cfg.checkpoint.dir), env.rank, env.world_size, _agreed_stamp(),
                            cfg.train.hang_timeout_s, cfg.train.collective_timeout_s)
    # the watchdog first: it must know the step before another observer's hook can stall in it
    observers = Observers([watchdog, Faults(prep.engine), log, profiler, *_sampler(cfg, env, tracker)])
    outcome = Outcome(code=-1, step=prep.start, status="FAILED")  # an error no branch below expects
    try:
        outcome = _outcome_of_steps(cfg, env, ckpt, prep, stop, tracker, observers, profiler)
    finally:
        finish(outcome, cfg, env, tracker, observers, log)
    return outcome.code


def _outcome_of_steps(cfg: Config, env: DistEnv, ckpt: CheckpointManager, prep: Prepared, stop: StopRequest,
                      tracker: Tracker | None, observers: Observers, profiler: StepProfiler) -> Outcome:
    """The steps, and the ways they can end that are not a bug."""
    try:
        return steps(cfg, env, ckpt, prep, stop, tracker, observers)
    except NeedsPerson as e:  # a non-finite streak, or a spike past what train.spike may roll back
        try:
            ckpt.wait()  # a save of the last good state may still be in flight
        except checkpoint.CheckpointWriteError as failed:
            return _save_failed(failed)
        return Outcome(EXIT_NEEDS_PERSON, -1, f"{e}; exit {EXIT_NEEDS_PERSON}", status="FAILED")
    except checkpoint.CheckpointWriteError as e:
        return _save_failed(e)
    except BaseException as e:
        ckpt.abandon()
        if snapshot := profiler.out_of_memory(e):
            say(f"rank {env.rank}: out of memory; the allocator's history is in {snapshot}")
        if not lost_peer(e):
            raise
        reason = str(e).splitlines()[0].rsplit("] ", 1)[-1]  # gloo's message without its source location
        return Outcome(EXIT_LOST_PEER, -1, f"rank {env.rank}: a collective failed ({reason}): another rank died or "
                       f"stopped answering (train.collective_timeout_s={cfg.train.collective_timeout_s:g}); exit "
                       f"{EXIT_LOST_PEER}, resume from the last checkpoint", each_rank=True, status="FAILED",
                       close_groups=False)


def steps(cfg: Config, env: DistEnv, ckpt: CheckpointManager, prep: Prepared, stop: StopRequest,
          tracker: Tracker | None, observers: Observer) -> Outcome:
    """Step until `train.max_steps`, a stop request or a rollback that restarts; a stop saves first."""
    engine, spikes, t = prep.engine, prep.spikes, cfg.train
    batches, streak, step = iter(prep.loader), 0, prep.start
    while step < t.max_steps:
        step += 1
        observers.before_step(step)
        res = engine.train_step(batches, measure=prep.stragglers.measures(step))
        streak = streak + 1 if res.skipped else 0
        slowest = prep.stragglers.observe(step, res.compute_s)
        val = prep.held_out.evaluate(engine) if _due(step, t.eval_every) else None
        downstream = prep.downstream.run() if _due(step, cfg.eval.every) else None
        verdict = spikes.observe(step, res)
        _report_commits(ckpt, observers, most=1)  # a save's figures are known once it has committed
        observers.after_step(StepReport(step, res, val, verdict, spikes.count, downstream, slowest))
        if streak >= t.max_nonfinite_steps:
            raise NonFiniteAbort(f"aborting at step {step}: {streak} non-finite steps in a row "
                                 f"(train.max_nonfinite_steps={t.max_nonfinite_steps}); the last checkpoint in "
                                 f"{cfg.checkpoint.dir} holds the last good state")
        stopping, spiked = env.any_of(stop.requested, verdict.confirmed)  # every rank stops or rolls back here
        if spiked:
            record = spikes.roll_back(step, verdict, res, engine, prep.loader, batches)
            observers.after_rollback(record)
            step = int(record["restored_step"])
            if stopping or record["restart"]:  # the rollback is durable: the requeued run resumes from it
                return _requeue(stop, step, "rolled back to its checkpoint, nothing new to save",
                                cause=None if stopping else "restarting to roll back")
            continue
        # A stop saves even inside a non-finite streak or a suspected spike: skipped steps changed no weights, and
        # the requeued run must resume from here. Periodic saves wait for a calm, finite step.
        last = step == t.max_steps and cfg.checkpoint.final
        if stopping or last or (_due(step, cfg.checkpoint.every) and streak == 0 and spikes.calm):
            ckpt.save(step, checkpoint_run_id(tracker, prep.mlflow_run_id),
                      on_commit=(lambda s=step: tracker.flush(up_to=s)) if tracker else None)
            observers.after_save(step)
        if stopping:  # the notice's lead time must cover a step and this save: say how long the save took
            saved = ckpt.wait()
            _report_commits(ckpt, observers)
            return _requeue(stop, step, f"checkpoint committed (saved in {saved.total_s:.1f} s)")
    ckpt.wait()
    _report_commits(ckpt, observers)
    return Outcome(EXIT_OK, step)


def _report_commits(ckpt: CheckpointManager, observers: Observer, most: int | None = None) -> None:
    """The saves committed since the last call, oldest first (at most `most`), told to the observers."""
    count = 0
    while (most is None or count < most) and (saved := ckpt.committed()) is not None:
        observers.after_commit(saved)
        count += 1


def finish(outcome: Outcome, cfg: Config, env: DistEnv, tracker: Tracker | None, observers: Observer,
           log: StepLog | None = None) -> int:
    """The one teardown: the observers closed (this launch's segment recorded), the outcome said, the MLflow run
    ended, the process groups closed; a finished run also writes its summary and registers its model."""
    observers.close()
    if outcome.code == EXIT_OK and log is not None:
        log.summary(outcome.step)
    if outcome.line and (env.rank == 0 or outcome.each_rank):
        say(outcome.line)
    if tracker:
        if outcome.status == "FAILED":
            tracker.discard()  # the steps never checkpointed: the resumed run logs them
        tracker.finish(outcome.status)
    if outcome.close_groups:
        env.destroy()
    if outcome.code == EXIT_OK and cfg.train.register_as and env.rank == 0:
        register_final(cfg)
    return outcome.code


def register_final(cfg: Config) -> None:
    """train.register_as: the final checkpoint, exported and registered by the same code as `pretrain export-hf
    --register` (pretrain/telemetry/model_registry.py)."""
    run_dir = Path(cfg.checkpoint.dir)
    try:
        model_registry.export_and_register(run_dir, cfg.train.register_as)
    except Exception as e:  # noqa: BLE001 - the training is done and saved; registering is an extra
        say(f"could not export and register the last checkpoint of {run_dir} ({type(e).__name__}: {e}); the "
            f"checkpoint itself is complete")


# --------------------------------------------------------------------------------------------- ingredients


def _agreed_stamp() -> str:
    """Rank 0's start time, the same on every rank (collective): names this launch's hang dumps."""
    stamp = [time.strftime("%Y%m%d-%H%M%S")]
    dist.broadcast_object_list(stamp, src=0)
    return stamp[0]


def _downstream(cfg: Config, run: ResolvedRun, env: DistEnv, engine: Engine) -> Any:
    """`eval.tasks` on the live engine (lm-eval imported only when asked for); task names checked now."""
    if not cfg.eval.tasks:
        return None
    try:
        from pretrain.eval.in_loop import DownstreamEval
    except ImportError as e:
        raise ConfigError(f"eval.tasks needs lm-evaluation-harness ({e}): pip install 'llama-pretrain[eval]'") \
            from None
    return DownstreamEval(cfg, run, env, engine)


def _due(step: int, every: int) -> bool:
    return every > 0 and step % every == 0


def _requeue(stop: StopRequest, step: int, what: str, cause: str | None = None) -> Outcome:
    """Once the state to resume from is durable (`what` says how: the stop checkpoint, with the time its save
    took, so the notice's lead time can be checked). `cause`: why, when it was not a signal."""
    who = f"signal {signal.Signals(stop.signum).name}" if stop.signum else "a signal on another rank"
    return Outcome(EXIT_REQUEUE, step, f"{cause or f'stopped by {who}'} at step {step}; {what}; exit {EXIT_REQUEUE} "
                   "(requeue)", status="KILLED")


def _save_failed(error: Exception) -> Outcome:
    return Outcome(EXIT_SAVE_FAILED, -1, f"{error}; exit {EXIT_SAVE_FAILED}", status="FAILED")


@contextlib.contextmanager
def _groups_closed_on_error(env: DistEnv) -> Iterator[None]:
    """A refused checkpoint, a held run lock or bad data once the groups exist: close them, so the CLI's one line
    and exit 2 are the end (gloo's threads left to interpreter exit can abort the process: "terminate called
    ...", -6)."""
    try:
        yield
    except BaseException:
        env.destroy()
        raise


class _Sampler(Observer):
    """MLflow's system metrics, stopped with the launch."""

    def __init__(self, monitor: Any) -> None:
        self.monitor = monitor

    def close(self) -> None:
        self.monitor.finish()


def _sampler(cfg: Config, env: DistEnv, tracker: Tracker | None) -> list[Observer]:
    """MLflow's system metrics on each node's first rank (collective: rank 0 tells the others the run id)."""
    if not cfg.tracking.enabled or cfg.tracking.system_metrics_s <= 0:
        return []
    shared = [tracker.run_id if tracker else None, tracker.uri if tracker else None]
    dist.broadcast_object_list(shared, src=0)
    run_id, uri = shared
    if run_id is None or env.local_rank != 0:
        return []
    node = int(os.environ.get("GROUP_RANK", "0"))
    return [_Sampler(system_metrics(run_id, uri, cfg.tracking.system_metrics_s, node))]
