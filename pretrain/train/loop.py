"""`pretrain train`: config -> process groups -> data -> engine -> maybe resume -> loop -> summary.

The recipe is `train()`; every ingredient is a call into a named module (checkpoint, tracking, metrics, signals).
What a step means: `engine.train_step` consumes `grad_accum` micro-batches of `micro_batch_size` sequences on every
rank, averages the per-token loss over them and over DP, and takes one optimizer step (or none, with
`skipped=True`, when the loss or grad norm is not finite). Step numbers count optimizer steps from 1.

Exit codes (pretrain/run/exits.py): 0 done; 42 stopped by SIGTERM/SIGUSR1/SIGINT after a committed checkpoint (requeue me; a second
SIGINT exits 130 at once, see pretrain/train/signals.py); 3 needs a person: `train.max_nonfinite_steps` non-finite steps
in a row (nothing checkpointed from the bad streak), or a loss spike that `train.spike` could not roll back
(max_rollbacks used up, no checkpoint before it; pretrain/train/rollback.py); 4 another rank
died or stopped answering (a collective failed or waited past `train.collective_timeout_s`); 5 a checkpoint
could not be written (disk full, quota, read-only: one line naming the cause and the last good checkpoint; the
unfinished copy removed); 2 bad config/data/checkpoint (one line on stderr).
"""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import torch.distributed as dist

from pretrain import checkpoint
from pretrain.checkpoint.manager import CheckpointManager
from pretrain.config import Config
from pretrain.console import say
from pretrain.run.distributed import init_distributed, lost_peer
from pretrain.run.exits import EXIT_LOST_PEER, EXIT_NEEDS_PERSON, EXIT_OK, EXIT_REQUEUE, EXIT_SAVE_FAILED
from pretrain.run.paths import PROFILE_DIR
from pretrain.run.resolved import ResolvedRun, held_out_note, resolve_run
from pretrain.telemetry import metrics, model_registry
from pretrain.telemetry.tracking import checkpoint_run_id, open_tracker, system_metrics
from pretrain.train.data import HeldOut, make_loader
from pretrain.train.engine import build_engine
from pretrain.train.faults import Faults
from pretrain.train.profiling import StepProfiler
from pretrain.train.rollback import NeedsPerson, SpikeGuard
from pretrain.train.signals import StopRequest
from pretrain.train.step_log import StepLog, append_segment

class NonFiniteAbort(NeedsPerson):
    """Too many non-finite steps in a row: the run stops without checkpointing the bad streak."""


def train(cfg: Config, stop: StopRequest | None = None) -> int:
    """`stop`: handlers installed by the caller as early as possible (the CLI does it before importing torch)."""
    stop = stop or StopRequest().install()
    started = time.time()
    run = resolve_run(cfg, int(os.environ.get("WORLD_SIZE", 1)))
    env = init_distributed(cfg, layout=run.layout)
    try:
        ckpt = CheckpointManager(cfg, run, env, say)  # holds the run lock: one launch per checkpoint.dir
    except BaseException:
        env.destroy()
        raise
    try:
        return _train(cfg, stop, run, env, ckpt, started)
    finally:
        ckpt.close()


def _train(cfg: Config, stop: StopRequest, run: ResolvedRun, env: Any, ckpt: Any, started: float) -> int:
    try:
        begin = ckpt.start_point()  # before building: a bad checkpoint fails fast
        loader = make_loader(cfg, run, env)
        held_out = HeldOut(cfg, run, env)  # built once: manifests read and batches taken at the first eval only
        engine = build_engine(cfg, env, run, begin.init)
        env.apply_collective_timeout()  # DeepSpeed's own groups too (see DistEnv.apply_collective_timeout)
        restored = ckpt.restore(begin, engine, loader)  # None: nothing to restore
        spikes = SpikeGuard(cfg, env, ckpt, say)
        after_rollback = spikes.resumed(restored, loader)  # the detector's history; the data a rollback skipped
    except BaseException:
        # A refused checkpoint or bad data once the groups exist: close them, so the CLI's one line and exit 2 are
        # the end (gloo's threads left to interpreter exit can abort the process: "terminate called ...", -6).
        env.destroy()
        raise
    start, run_id = (restored.step, restored.meta.mlflow_run_id) if restored else (0, None)
    run_dir = Path(cfg.checkpoint.dir)
    history: list[dict[str, Any]] = []
    if env.rank == 0:
        metrics.truncate_after(run_dir, start)  # steps past the checkpoint are redone: never twice in the file
        history = metrics.read(run_dir)  # for the backfill
        lay = run.layout
        say(f"{begin.describe(cfg.model.init_from)} at step {start}; world {lay.world} = tp {lay.tp} x pp {lay.pp} "
            f"x dp {lay.dp}, ZeRO-{run.zero_stage}, global batch {lay.global_batch} x {run.seq_len} tokens")
        for note in (held_out_note(cfg, run), after_rollback):
            if note:
                say(note)
    if stop.should_stop(env):  # preempted while starting: nothing new to save (a fresh start just starts again)
        if env.rank == 0:
            append_segment(run_dir, start, start, started)
        return requeue(env, stop, start, None, "before the first step, nothing to save")
    tracker = open_tracker(cfg, run, env.rank, resume_run_id=run_id, resume_step=start, history=history)
    monitor = start_system_metrics(cfg, env, tracker)
    log = StepLog(cfg, run, env, tracker, start)
    faults = Faults()
    profiler = StepProfiler(cfg.train.profile, run_dir, env.rank)
    log.profiles = profiler.dir

    batches, streak, step = iter(loader), 0, start
    try:
        while step < cfg.train.max_steps:
            step += 1
            faults.before_step(step, engine)
            profiler.before(step)
            res = engine.train_step(batches)
            streak = streak + 1 if res.skipped else 0
            val = held_out.evaluate(engine) if _due(step, cfg.train.eval_every) else None
            verdict = spikes.observe(step, res)
            log.step(step, res, val, verdict, spikes.count)
            if profiler.after(step):
                env.barrier()  # every rank's trace is written
                if env.rank == 0:
                    say(f"profile of steps {profiler.first}-{profiler.last}: {profiler.dir} (one trace per rank)")
                    if tracker:
                        tracker.artifact_dir(profiler.dir, PROFILE_DIR)
            if streak >= cfg.train.max_nonfinite_steps:
                raise NonFiniteAbort(f"aborting at step {step}: {streak} non-finite steps in a row "
                                     f"(train.max_nonfinite_steps={cfg.train.max_nonfinite_steps}); the last "
                                     f"checkpoint in {run_dir} holds the last good state")
            # One collective: every rank stops, or rolls back, at this same step.
            stopping, spiked = env.any_of(stop.requested, verdict.confirmed)
            if spiked:
                record = spikes.roll_back(step, verdict, res, engine, loader, batches)
                faults.after_rollback()
                step = log.rolled_back(record)
                if stopping or record["restart"]:  # the rollback is durable: the requeued run resumes from it
                    return requeue(env, stop, step, tracker, "rolled back to its checkpoint, nothing new to save",
                                   cause=None if stopping else "restarting to roll back")
                continue
            # A stop saves even inside a non-finite streak or a suspected spike: skipped steps changed no weights,
            # and the requeued run must resume from here. Periodic saves wait for a calm, finite step.
            last = step == cfg.train.max_steps and cfg.checkpoint.final
            if stopping or last or (_due(step, cfg.checkpoint.every) and streak == 0 and spikes.calm):
                ckpt.save(step, engine, loader, checkpoint_run_id(tracker, run_id),
                          on_commit=(lambda s=step: tracker.flush(up_to=s)) if tracker else None,
                          extra=spikes.state())
                log.committed()
            if stopping:  # the notice's lead time must cover a step and this save: say how long the save took
                saved = f"checkpoint committed (saved in {ckpt.wait().total_s:.1f} s)"
                return requeue(env, stop, step, tracker, saved)
        ckpt.wait()
    except NeedsPerson as e:  # a non-finite streak, or a spike past what train.spike may roll back
        try:
            ckpt.wait()  # a save of the last good state may still be in flight
        except checkpoint.CheckpointWriteError as failed:
            return save_failed(failed, env, tracker)
        if env.rank == 0:
            say(f"{e}; exit {EXIT_NEEDS_PERSON}")
        mark_failed(tracker)
        env.destroy()
        return EXIT_NEEDS_PERSON
    except checkpoint.CheckpointWriteError as e:
        return save_failed(e, env, tracker)
    except BaseException as e:
        ckpt.abandon()
        if snapshot := profiler.out_of_memory(e):
            say(f"rank {env.rank}: out of memory; the allocator's history is in {snapshot}")
        mark_failed(tracker)
        if lost_peer(e):  # one line instead of a library traceback per rank
            reason = str(e).splitlines()[0].rsplit("] ", 1)[-1]  # gloo's message without its source location
            say(f"rank {env.rank}: a collective failed ({reason}): another rank died or "
                f"stopped answering (train.collective_timeout_s={cfg.train.collective_timeout_s:g}); exit "
                f"{EXIT_LOST_PEER}, resume from the last checkpoint")
            return EXIT_LOST_PEER
        env.destroy()
        raise
    finally:
        log.close()
        if monitor is not None:
            monitor.finish()
    log.summary(step)
    if tracker:
        tracker.finish("FINISHED")
    env.destroy()
    if cfg.train.register_as and env.rank == 0:
        register_final(cfg)
    return EXIT_OK


def save_failed(error: Exception, env: Any, tracker: Any) -> int:
    if env.rank == 0:
        say(f"{error}; exit {EXIT_SAVE_FAILED}")
    mark_failed(tracker)
    env.destroy()
    return EXIT_SAVE_FAILED


def mark_failed(tracker: Any) -> None:
    """The MLflow run of a failed launch: the never-checkpointed steps dropped (the resumed run logs them)."""
    if tracker:
        tracker.discard()
        tracker.finish("FAILED")


def start_system_metrics(cfg: Config, env: Any, tracker: Any) -> Any:
    """MLflow's system metrics on each node's first rank (collective: rank 0 tells the others the run id)."""
    if not cfg.tracking.enabled or cfg.tracking.system_metrics_s <= 0:
        return None
    shared = [tracker.run_id if tracker else None, tracker.uri if tracker else None]
    dist.broadcast_object_list(shared, src=0)
    run_id, uri = shared
    if run_id is None or env.local_rank != 0:
        return None
    return system_metrics(run_id, uri, cfg.tracking.system_metrics_s, int(os.environ.get("GROUP_RANK", "0")))


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


def _due(step: int, every: int) -> bool:
    return every > 0 and step % every == 0


def requeue(env: Any, stop: StopRequest, step: int, tracker: Any, what: str, cause: str | None = None) -> int:
    """Once the state to resume from is durable (`what` says how: the stop checkpoint, with the time its save
    took, so the notice's lead time can be checked): say so once, mark the MLflow run, hand back the requeue
    code. `cause`: why, when it was not a signal."""
    if env.rank == 0:
        who = f"signal {signal.Signals(stop.signum).name}" if stop.signum else "a signal on another rank"
        say(f"{cause or f'stopped by {who}'} at step {step}; {what}; exit {EXIT_REQUEUE} (requeue)")
    if tracker:
        tracker.finish("KILLED")
    env.destroy()
    return EXIT_REQUEUE
