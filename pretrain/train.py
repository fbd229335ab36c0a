"""`pretrain train`: config -> process groups -> data -> engine -> maybe resume -> loop -> summary.

The recipe is `train()`; every ingredient is a call into a named module (checkpoint, tracking, metrics, signals).
What a step means: `engine.train_step` consumes `grad_accum` micro-batches of `micro_batch_size` sequences on every
rank, averages the per-token loss over them and over DP, and takes one optimizer step (or none, with
`skipped=True`, when the loss or grad norm is not finite). Step numbers count optimizer steps from 1.

Exit codes (pretrain/exits.py): 0 done; 42 stopped by SIGTERM/SIGUSR1/SIGINT after a committed checkpoint (requeue me; a second
SIGINT exits 130 at once, see pretrain/signals.py); 3 needs a person: `train.max_nonfinite_steps` non-finite steps
in a row (nothing checkpointed from the bad streak), or a loss spike that `train.spike` could not roll back
(max_rollbacks used up, no checkpoint before it; pretrain/rollback.py); 4 another rank
died or stopped answering (a collective failed or waited past `train.collective_timeout_s`); 5 a checkpoint
could not be written (disk full, quota, read-only: one line naming the cause and the last good checkpoint; the
unfinished copy removed); 2 bad config/data/checkpoint (one line on stderr).

Fault injection for tests (documented, env only, off by default): PRETRAIN_INJECT_NONFINITE="5,6" makes the loss
of optimizer steps 5 and 6 NaN inside the engine's forward, so the engine's non-finite guard -- not ours -- is
what gets exercised; PRETRAIN_INJECT_SIGKILL="before_step:31", "after_rollback" or "during_lookahead" (once a
rollback's look-ahead judged a batch spike-level, pretrain/rollback.py) kills every rank with SIGKILL there (a
node lost at the worst moment: the resume must reach the same state).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from pretrain import checkpoint, metrics
from pretrain.config import Config
from pretrain.resolved import ResolvedRun, held_out_note, resolve_run
from pretrain.profiling import PROFILE_DIR, StepProfiler
from pretrain.rollback import NeedsPerson, SpikeGuard
from pretrain.exits import EXIT_LOST_PEER, EXIT_NEEDS_PERSON, EXIT_OK, EXIT_REQUEUE, EXIT_SAVE_FAILED
from pretrain.signals import StopRequest
from pretrain.tracking import checkpoint_run_id, open_tracker, step_values, ui_hint


class NonFiniteAbort(NeedsPerson):
    """Too many non-finite steps in a row: the run stops without checkpointing the bad streak."""


def train(cfg: Config, stop: StopRequest | None = None) -> int:
    """`stop`: handlers installed by the caller as early as possible (the CLI does it before importing torch)."""
    stop = stop or StopRequest().install()
    started = time.time()
    from pretrain.checkpoint.manager import CheckpointManager
    from pretrain.distributed import init_distributed

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
    from pretrain.distributed import lost_peer
    from pretrain.engine import build_engine

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
    import torch.distributed as dist

    shared = [tracker.run_id if tracker else None, tracker.uri if tracker else None]
    dist.broadcast_object_list(shared, src=0)
    run_id, uri = shared
    if run_id is None or env.local_rank != 0:
        return None
    from pretrain.tracking import system_metrics

    return system_metrics(run_id, uri, cfg.tracking.system_metrics_s, int(os.environ.get("GROUP_RANK", "0")))


def register_final(cfg: Config) -> None:
    """train.register_as: the final checkpoint, exported and registered by the same code as `pretrain export-hf
    --register` (pretrain/model_registry.py)."""
    from pretrain.cli import main as cli

    run_dir = Path(cfg.checkpoint.dir)
    step_dir = checkpoint.resolve_checkpoint_arg(run_dir)
    out = run_dir / "hf" / step_dir.name
    try:
        failed = cli(["export-hf", "--checkpoint", str(step_dir), "--out", str(out), "--register",
                      cfg.train.register_as])
    except Exception as e:  # noqa: BLE001 - the training is done and saved; registering is an extra
        failed, _ = 1, say(f"registering failed: {type(e).__name__}: {e}")
    if failed:
        say(f"could not export and register {step_dir} (see above); the checkpoint itself is complete")


# --------------------------------------------------------------------------------------------- ingredients


def say(msg: str) -> None:
    print(f"[train] {msg}", file=sys.stderr, flush=True)


def _due(step: int, every: int) -> bool:
    return every > 0 and step % every == 0


def make_loader(cfg: Config, run: ResolvedRun, env: Any, *, validation: bool = False):
    """This rank's data: TP and PP peers of one DP group read the same stream. The sources are the resolved ones
    (local paths absolute). Validation reads data.val_path in its sources' own token proportions: data.weights
    is the training mixture, one weight per entry of data.path, and means nothing for the held-out shards."""
    from data_pipeline.loader import TokenLoader

    facts, weights = (run.val_data, None) if validation else (run.train_data, cfg.data.weights)
    return TokenLoader(list(facts.sources), seq_len=run.seq_len, batch_size=cfg.train.micro_batch_size,
                       dp_rank=env.dp_rank, dp_size=env.dp_size, num_workers=cfg.data.num_workers,
                       seed=cfg.train.seed, shuffle_buffer=cfg.data.shuffle_buffer, weights=weights,
                       document_mask=cfg.model.document_mask, reshard=cfg.data.reshard)


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


class HeldOut:
    """The validation set: the first `train.eval_steps` micro-batches of the held-out shards, the same ones for
    every eval. They are read once, at the first eval, and kept (eval_steps x micro_batch x (seq_len + 1) tokens:
    kilobytes to a few MB), so an eval neither re-reads manifests nor restarts loader workers. The shards were
    checked at start (`resolve_run`: they exist, share the training tokenizer, suffice for every DP rank x
    worker)."""

    def __init__(self, cfg: Config, run: ResolvedRun, env: Any) -> None:
        self.steps = cfg.train.eval_steps
        self.loader = make_loader(cfg, run, env, validation=True) if run.val_data is not None else None
        self.batches: list[Any] | None = None

    def evaluate(self, engine: Any) -> float | None:
        """Mean loss over the held-out micro-batches (collective: every rank calls it at the same step)."""
        if self.batches is None:
            if self.loader is None:  # no data.val_path
                return None
            stream = iter(self.loader)
            self.batches = [next(stream) for _ in range(self.steps)]
            stream.close()  # stops the loader's workers now
            self.loader = None
        batches = iter(self.batches)
        return sum(engine.eval_step(batches) for _ in range(self.steps)) / self.steps


SEGMENTS_FILE = "segments.jsonl"  # one line per launch of the run: its steps and wall time (summary.json sums them)
SUMMARY_FILE = "summary.json"


class StepLog:
    """Rank 0's outputs per step: metrics.jsonl, MLflow buffer, and a progress bar or plain log lines; per
    segment (one launch: a requeue or resume starts the next), a line in segments.jsonl; at the end summary.json."""

    def __init__(self, cfg: Config, run: ResolvedRun, env: Any, tracker: Any, start: int) -> None:
        self.cfg, self.env, self.tracker, self.start = cfg, env, tracker, start
        self.on = env.rank == 0
        tokens_per_step = run.tokens_per_step
        self.meter = metrics.Meter(flops_per_token=metrics.flops_per_token(run.model, run.seq_len,
                                                                           run.model.vocab_size),
                                   tokens_per_step=tokens_per_step, world_size=run.layout.world,
                                   peak_tflops=metrics.device_peak_tflops(cfg.train.peak_tflops),
                                   start_tokens=start * tokens_per_step, max_steps=cfg.train.max_steps)
        self.file = metrics.MetricsFile(cfg.checkpoint.dir) if self.on else None
        self.bar = None
        if self.on and sys.stderr.isatty():
            from tqdm import tqdm
            self.bar = tqdm(total=cfg.train.max_steps, initial=start, unit="step", dynamic_ncols=True, mininterval=0.5)
        self.last: metrics.StepRecord | None = None
        self.profiles: Path | None = None  # set when a profile is asked for (pretrain/profiling.py)
        self.skipped = 0
        self.t0 = time.time()
        self.at = start  # the last step this segment ran
        self.segments = Path(cfg.checkpoint.dir) / SEGMENTS_FILE
        if self.on and start == 0 and any(seg["end_step"] > 0 for seg in self._segments()):
            # A fresh start: earlier segments belong to another run. Ones that ended before their first step
            # (stopped while starting, then requeued) are this run's beginning and stay.
            self.segments.unlink()

    def step(self, step: int, res: Any, val: float | None, verdict: Any = None, rollbacks: int | None = None) -> None:
        rec = self.meter.record(step, float(res.loss), float(res.lr), float(res.grad_norm), bool(res.skipped),
                                data_wait_s=getattr(res, "data_wait_s", None))
        if verdict is not None:
            rec.loss_z, rec.grad_norm_z = verdict.loss_z, verdict.grad_norm_z
        rec.rollbacks = rollbacks
        if val is not None:
            rec.val_loss, rec.val_ppl = val, math.exp(min(val, 50.0))
        self.last, self.skipped, self.at = rec, self.skipped + int(rec.skipped), step
        if not self.on:
            return
        self.file.append(rec)
        if self.tracker:
            self.tracker.log_step(step, step_values(dataclasses.asdict(rec)))
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix_str(rec.line().split(" | ", 1)[1], refresh=False)
        elif step % self.cfg.train.log_every == 0 or rec.skipped or val is not None or step == self.start + 1:
            print(rec.line(), flush=True)

    def committed(self) -> None:
        self.meter.restart_clock()  # a checkpoint's time is not a step's time

    def rolled_back(self, record: dict[str, Any]) -> int:
        """After a spike rollback: metrics.jsonl cut back to the restored step (the discarded records are in
        rollbacks.jsonl), MLflow told; the step the loop continues from."""
        step = int(record["restored_step"])
        self.meter.tokens = step * self.meter.tokens_per_step
        self.meter.restart_clock()
        self.at = step
        if self.on:
            self.file.close()
            metrics.truncate_after(self.cfg.checkpoint.dir, step)
            self.file = metrics.MetricsFile(self.cfg.checkpoint.dir)
            if self.bar is not None:
                self.bar.n = step
            if self.tracker:
                self.tracker.rolled_back(record)
        return step

    def close(self) -> None:
        """End of this segment however it ends (done, stopped, aborted, failed): appended to segments.jsonl."""
        if self.bar is not None:
            self.bar.close()
        try:  # on a full disk these fail too; the error that ended the segment is the one to report
            if self.file is not None:
                self.file.close()
            if self.on:
                append_segment(Path(self.cfg.checkpoint.dir), self.start, self.at, self.t0)
        except OSError as e:
            say(f"could not record this segment ({e.strerror or e}: {e.filename})")

    def _segments(self) -> list[dict[str, Any]]:
        if not self.segments.exists():
            return []
        return [json.loads(line) for line in self.segments.read_text().splitlines() if line.strip()]

    def summary(self, step: int) -> None:
        if not self.on:
            return
        run_dir = Path(self.cfg.checkpoint.dir).resolve()
        segments = self._segments()  # this one included: close() ran first
        summary = {"final_step": step, "final_loss": self.last.loss if self.last else None,
                   "skipped_steps": self.skipped, "wall_s": round(sum(s["wall_s"] for s in segments), 3),
                   "segments": segments, "tokens": self.meter.tokens, "checkpoint": _latest(run_dir),
                   "metrics": str(run_dir / metrics.METRICS_FILE)}
        if self.tracker:
            summary.update(mlflow_uri=self.tracker.uri, mlflow_run_id=self.tracker.run_id)
            self.tracker.artifact_text(json.dumps(summary, indent=1), SUMMARY_FILE)
        tmp = run_dir / f".{SUMMARY_FILE}.tmp"
        tmp.write_text(json.dumps(summary, indent=1))
        tmp.replace(run_dir / SUMMARY_FILE)
        this = segments[-1]["wall_s"]
        wall = f"{this:.1f} s" if len(segments) == 1 else \
            f"{this:.1f} s this segment, {summary['wall_s']:.1f} s over {len(segments)} segments"
        lines = [f"done: step {step}, final loss {summary['final_loss']}, {self.skipped} skipped step(s), {wall}",
                 f"checkpoints: {run_dir} (latest: {summary['checkpoint'] or 'none written'})",
                 f"metrics:     {summary['metrics']}"]
        if self.profiles is not None and self.profiles.is_dir():
            lines.append(f"profiles:    {self.profiles.resolve()}")
        if self.tracker:
            lines += [f"mlflow:      {self.tracker.uri} run {self.tracker.run_id or '(not created: unreachable)'}",
                      f"             {ui_hint(self.tracker.uri)}"]
        print("\n".join(lines), flush=True)


def append_segment(run_dir: Path, start: int, end: int, t0: float) -> None:
    """One launch of the run in segments.jsonl: the steps it ran (none when stopped while starting), its wall time."""
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / SEGMENTS_FILE, "a") as f:
        f.write(json.dumps({"start_step": start, "end_step": end,
                            "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(t0)),
                            "wall_s": round(time.time() - t0, 3)}) + "\n")


def _latest(run_dir: Path) -> str | None:
    latest = run_dir / checkpoint.LATEST
    return str(run_dir / latest.read_text().strip()) if latest.exists() else None


# ------------------------------------------------------------------------------------------ fault injection


class Faults:
    """The PRETRAIN_INJECT_* hooks of the module docstring (tests only)."""

    def __init__(self) -> None:
        self.nonfinite = {int(s) for s in os.environ.get("PRETRAIN_INJECT_NONFINITE", "").split(",") if s.strip()}
        self.kill = os.environ.get("PRETRAIN_INJECT_SIGKILL", "")

    def before_step(self, step: int, engine: Any) -> None:
        if self.kill == f"before_step:{step}":
            os.kill(os.getpid(), signal.SIGKILL)
        if step in self.nonfinite:
            engine.inject_nonfinite()  # this step's loss becomes NaN inside the engine

    def after_rollback(self) -> None:
        if self.kill == "after_rollback":
            os.kill(os.getpid(), signal.SIGKILL)
