"""`train.spike`: a confirmed loss spike rolls the run back to the newest checkpoint from before it and skips the
data read since, in the running process (PaLM's manual recovery, automated; detection is pretrain/train/spikes.py).

A rollback, on every rank at the same step (the loop agreed on it):
  1. wait for the save in flight; the target is the newest committed checkpoint from before the step that
     precedes the spike's first suspicious step (a stretch that starts inside a step's batch lifts that step's
     loss only by the part it fills, often too little to be suspicious: that step is not trusted either),
     verified by all ranks; none, or `max_rollbacks` used up: the run stops, exit 3 ("needs a person"), with a
     line saying why;
  2. the loader is NOT rewound: it stays past every batch the window read (restored step + 1 .. the spike), and
     skips `skip_batches` more global batches;
  3. weights, optimizer, step, RNG and the detector's history come back from the target (CheckpointManager.rewind;
     a target of another layout, from before a resume that re-sliced it, is re-sliced only when an engine is
     built: the run exits 42, to be requeued, and the next launch starts from it as in step 5, without step 4);
  4. the look-ahead (`max_skip_batches` > 0): a poisoned stretch can be longer than what the window read, and
     training into its rest would spike again, a rollback per window. So the next global batches are judged
     before any is trained, each by a forward-only pass of the restored weights (Engine.eval_step, the held-out
     evaluation's path: no gradient, no update; the loss is the mean over the batch's micro-batches and the DP
     ranks, the loss a training step on it would report) and the detector's robust z against the restored
     history; a batch is spike-level above half the `threshold` (`LOOKAHEAD_BAR`: a false alarm here costs a
     batch of data, not a rollback). Spike-level ones are skipped, and so is the first calm one: the stretch's
     edge, which it may end inside, lifting that batch's loss too little to be judged (the same reason as step
     1's); the loop goes on with the batch after it. At most `max_skip_batches` are judged; every rank agrees on
     each decision (`DistEnv.any_of`). Cost: one forward per judged batch, 0.28-0.32 of a training step each
     (debug model, one CPU rank, grad_accum 1 and 4);
  5. the decision is made durable, in an order where a kill at any point resumes to the same decisions:
     every rank's loader state (past the look-ahead) -> rollbacks/<n>/; rank 0 points `latest` at the target and
     removes the checkpoints after it (they hold the spike); last, rank 0 appends the record to rollbacks.jsonl
     (the commit point, with the look-ahead's judgements and the discarded steps' metrics). Killed before the
     record (during the look-ahead too): the resume starts from the newest checkpoint, reads the same data,
     sees the same spike and judges the same batches ahead. Killed after: the resume starts from the target
     with the recorded loader state (`SpikeGuard.resumed`), so the skipped samples are never read again.
     metrics.jsonl is cut back to the target (it keeps one record per trained step; the spike's records are in
     rollbacks.jsonl); MLflow gets a `rollbacks` metric and a tag per rollback; the loop continues from the
     target.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterator

from data_pipeline.loader import TokenLoader
from pretrain import checkpoint
from pretrain.checkpoint.manager import CheckpointManager
from pretrain.config import Config
from pretrain.console import say
from pretrain.run.distributed import DistEnv
from pretrain.run.layout import stream_rank
from pretrain.run.paths import ROLLBACK_STATES_DIR, ROLLBACKS_FILE, rollback_state_file
from pretrain.telemetry import metrics
from pretrain.train.engine import Engine, StepResult
from pretrain.train.spikes import MIN_HISTORY, SpikeDetector, Verdict

_CALM = Verdict(None, None, False, False)
# A batch ahead is spike-level when its loss z exceeds this fraction of `threshold`: a false alarm there costs one
# batch of data, not a rollback, and the restored history, from further back on a falling curve, is wider than the
# one that confirmed the spike (the debug model's poisoned batches in tests/train/test_spike_rollback.py: z 9.9
# against the spike's history, 5.1-5.8 against the restored one; in six clean debug runs no step's z exceeded 3.4).
LOOKAHEAD_BAR = 0.5


class NeedsPerson(RuntimeError):
    """The run cannot heal itself: stopped with exit 3 and a line saying why."""


class SpikeGuard:
    """The detector, the run's record of rollbacks, and the rollback itself. With `train.spike.enabled` off,
    `observe` is a constant and nothing else runs."""

    def __init__(self, cfg: Config, env: DistEnv, ckpt: CheckpointManager | None) -> None:
        self.cfg, self.env, self.ckpt = cfg.train.spike, env, ckpt
        self.grad_accum = cfg.train.grad_accum
        self.run_dir = Path(cfg.checkpoint.dir)
        self.detector = SpikeDetector(self.cfg) if self.cfg.enabled else None
        self.records: list[dict[str, Any]] = []

    # ----------------------------------------------------------------------------------------- per step

    def observe(self, step: int, res: StepResult) -> Verdict:
        if self.detector is None:
            return _CALM
        return self.detector.observe(step, float(res.loss), float(res.grad_norm), bool(res.skipped))

    @property
    def calm(self) -> bool:
        return self.detector is None or self.detector.calm

    @property
    def count(self) -> int | None:
        return len(self.records) if self.detector is not None else None

    def state(self) -> dict[str, Any]:
        """What a checkpoint keeps of the detector (every rank's rank file)."""
        return {"spike": self.detector.state_dict()} if self.detector is not None else {}

    # ------------------------------------------------------------------------------------------ resume

    def resumed(self, restored: checkpoint.Loaded | None, loader: TokenLoader) -> str | None:
        """After the start point is restored: the record of this run's rollbacks, the detector's history, and the
        loader moved past the data a rollback to this checkpoint skipped. A line to say, or None."""
        if restored is None:  # a fresh start: an earlier run's rollbacks are not this one's (no rank reads them)
            if self.env.rank == 0:
                (self.run_dir / ROLLBACKS_FILE).unlink(missing_ok=True)
                shutil.rmtree(self.run_dir / ROLLBACK_STATES_DIR, ignore_errors=True)
            return None
        path = self.run_dir / ROLLBACKS_FILE
        if path.is_file():
            self.records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        if self.detector is not None and "spike" in restored.rank_state:
            self.detector.load_state_dict(restored.rank_state["spike"])
        mine = [r for r in self.records if r["restored_step"] == restored.step]
        if not mine:
            return None
        last = mine[-1]
        loader.load_state_dict(self._loader_states(last))
        ahead = last.get("lookahead", {}).get("skipped", 0)
        return (f"rollback {last['rollback']} restored this checkpoint: the loader continues past the "
                f"{last['skipped_batches']} batches it skipped (steps {last['restored_step'] + 1}-"
                f"{last['detected_at']}, {last['skip_batches']} more, and {ahead} judged by the look-ahead)")

    def _loader_states(self, record: dict[str, Any]) -> list[dict[str, Any]]:
        """Every DP rank's loader state after the rollback (one rank of each DP index wrote the same stream's):
        the loader takes its own, or re-splits them when this launch has another layout."""

        lay = SimpleNamespace(**{"cp": 1, **record["layout"]})  # records before context parallelism: cp 1
        folder = self.run_dir / ROLLBACK_STATES_DIR / str(record["rollback"])
        files = [folder / rollback_state_file(stream_rank(lay.tp * lay.cp, lay.dp, d)) for d in range(lay.dp)]
        return [json.loads(f.read_text()) for f in files]

    # --------------------------------------------------------------------------------------- rollback

    def roll_back(self, step: int, verdict: Verdict, res: StepResult, engine: Engine, loader: TokenLoader,
                  batches: Iterator[Any]) -> dict[str, Any]:
        """Collective. The record of the rollback: its `restored_step` is where the loop continues from, or, with
        `restart`, where the next launch starts (the run then exits 42 to be requeued)."""
        cfg, env = self.cfg, self.env
        first = verdict.first if verdict.first is not None else step
        what = (f"loss spike at steps {first}-{step} (loss {res.loss:.4g}, grad_norm {res.grad_norm:.4g}: "
                f"{verdict.why(cfg)})")
        n = len(self.records) + 1
        if n > cfg.max_rollbacks:
            raise NeedsPerson(f"{what}: {n - 1} rollback(s) taken, train.spike.max_rollbacks={cfg.max_rollbacks}; "
                              f"the run needs a person: look at the data and the learning rate (rollbacks.jsonl "
                              f"in {self.run_dir} records each spike), then resume, with a higher "
                              f"train.spike.max_rollbacks or threshold if the spikes were noise")
        self.ckpt.wait()
        target = self._target(first)
        if target is None:
            raise NeedsPerson(f"{what}: no checkpoint from before step {first - 1} to roll back to; the run needs "
                              "a person (a smaller checkpoint.every leaves one nearer)")
        try:
            step_dir = checkpoint.choose(self.run_dir, str(self.run_dir / checkpoint.step_dir_name(target)), env)
        except checkpoint.CheckpointError as e:
            raise NeedsPerson(f"{what}: cannot roll back: {e}") from None
        for _ in range(cfg.skip_batches * self.grad_accum):
            next(batches)
        read = step - target + cfg.skip_batches
        restart = not self.ckpt.rewindable(step_dir)
        if restart:  # written with another layout before a resume re-sliced it: only a start re-slices
            ahead = {"skipped": 0, "judged": [], "ended": "restart"}
            loader_state = loader.state_dict()
            then = f"{step_dir.name} has another layout, which only a start re-slices: restarting from it"
        else:
            loaded = self.ckpt.rewind(step_dir, engine)
            if self.detector is not None:
                self.detector.load_state_dict(loaded.rank_state["spike"])
            ahead, loader_state = self._look_ahead(engine, loader, batches)
            then = f"continuing from step {target}"
        lay = env.layout
        record = {"rollback": n, "first_step": first, "detected_at": step, "restored_step": target,
                  "skipped_batches": read + ahead["skipped"], "skip_batches": cfg.skip_batches, "lookahead": ahead,
                  "loss": res.loss, "grad_norm": res.grad_norm, "loss_z": verdict.loss_z,
                  "grad_norm_z": verdict.grad_norm_z,
                  "layout": {"tp": lay.tp, "pp": lay.pp, "dp": lay.dp, "cp": lay.cp}}
        self._make_durable(record, loader_state)
        self.records.append(record)
        record["restart"] = restart
        if env.rank == 0:
            say(f"{what}: rollback {n} of at most {cfg.max_rollbacks}: restored {step_dir.name}; the "
                     f"{read} global batches read since (and skipped) are never trained on; "
                     f"{_ahead_note(ahead, cfg.max_skip_batches)}; {then} (record: {self.run_dir / ROLLBACKS_FILE})")
        return record

    def _look_ahead(self, engine: Engine, loader: TokenLoader,
                    batches: Iterator[Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """Collective: step 4 of the module's docstring, with the restored weights and history. What it did (for
        the record) and this rank's loader state past the batches it skipped."""
        judged: list[dict[str, Any]] = []
        cfg, detector = self.cfg, self.detector
        if not cfg.max_skip_batches:
            ended = "off"
        elif detector is None or len(detector.losses) < detector.min_history:
            ended = "no history"
        else:
            ended = "max_skip_batches"
            while len(judged) < cfg.max_skip_batches:
                micro = [next(batches) for _ in range(self.grad_accum)]
                loss = forward_loss(engine, micro)
                z = detector.loss_z(loss)
                (spiky,) = self.env.any_of(z > LOOKAHEAD_BAR * cfg.threshold)
                judged.append({"loss": loss, "loss_z": z, "spike_level": spiky})
                if not spiky:  # the stretch's edge: skipped too
                    ended = "calm"
                    break
                if os.environ.get("PRETRAIN_INJECT_SIGKILL") == "during_lookahead":  # tests: pretrain/train/loop.py
                    os.kill(os.getpid(), signal.SIGKILL)
        return {"skipped": len(judged), "judged": judged, "ended": ended}, loader.state_dict()

    def _target(self, first: int) -> int | None:
        """The newest checkpoint before the step that precedes the spike's first suspicious step: a stretch that
        starts inside a step's batch lifts that step's loss only by the part it fills, often too little to be
        suspicious, so the step just before the spike is not trusted either."""
        before = [s for s in checkpoint.list_steps(self.run_dir) if s < first - 1]
        return max(before) if before else None

    def _make_durable(self, record: dict[str, Any], loader_state: dict[str, Any]) -> None:
        """The order of step 5 in the module's docstring; every rank hears of a failure on any."""
        env, folder = self.env, self.run_dir / ROLLBACK_STATES_DIR / str(record["rollback"])
        failure = None
        try:
            if env.rank == 0:
                shutil.rmtree(folder, ignore_errors=True)  # a killed earlier attempt of this same rollback
                folder.mkdir(parents=True)
        except OSError as e:
            failure = e
        _agree(env, failure)
        try:
            checkpoint.atomic_write(folder / rollback_state_file(env.rank), json.dumps(loader_state).encode())
        except OSError as e:
            failure = e
        _agree(env, failure)
        if env.rank == 0:
            target = record["restored_step"]
            checkpoint.point_latest(self.run_dir, target)
            for s in checkpoint.list_steps(self.run_dir):
                if s > target:
                    shutil.rmtree(self.run_dir / checkpoint.step_dir_name(s))
            discarded = [r for r in metrics.read(self.run_dir) if r.get("step", 0) > target]
            with open(self.run_dir / ROLLBACKS_FILE, "a") as f:
                f.write(json.dumps({**record, "discarded": discarded}) + "\n")
                f.flush()
                os.fsync(f.fileno())
        env.barrier()


def forward_loss(engine: Engine, micro: list[Any]) -> float:
    """The global batch's loss under the current weights, forward only (the eval path: no gradient, no update):
    the mean over its micro-batches and the DP ranks, the same on every rank, as a training step reports it."""
    it = iter(micro)
    return sum(engine.eval_step(it) for _ in micro) / len(micro)


def _ahead_note(ahead: dict[str, Any], bound: int) -> str:
    n, ended = ahead["skipped"], ahead["ended"]
    if ended == "off":
        return "no look-ahead (train.spike.max_skip_batches=0)"
    if ended == "restart":
        return "no look-ahead (it needs the restored weights in this process)"
    if ended == "no history":
        return f"no look-ahead (the restored history has fewer than {MIN_HISTORY} steps to judge against)"
    if ended == "max_skip_batches":
        return (f"a forward-only look-ahead skipped the next {n} too, all still spike-level "
                f"(train.spike.max_skip_batches={bound})")
    z = ahead["judged"][-1]["loss_z"]
    return (f"a forward-only look-ahead skipped the next {n} too: {n - 1} still spike-level, then a calm one "
            f"(loss z {z:.1f}), the stretch's edge")


def _agree(env: DistEnv, failure: OSError | None) -> None:
    if env.all_reduce_max(1.0 if failure else 0.0) > 0:
        raise NeedsPerson(f"could not record the rollback: {failure or 'failed on another rank (see its log)'}")
