"""`train.spike`: a confirmed loss spike rolls the run back to the newest checkpoint from before it and skips the
data read since, in the running process (PaLM's manual recovery, automated; detection is pretrain/spikes.py).

A rollback, on every rank at the same step (the loop agreed on it):
  1. wait for the save in flight; the target is the newest committed checkpoint with a step before the spike's
     first suspicious step, verified by all ranks; none, or `max_rollbacks` used up: the run stops, exit 3
     ("needs a person"), with a line saying why;
  2. the loader is NOT rewound: it stays past every batch the window read (restored step + 1 .. the spike), and
     skips `skip_batches` more global batches;
  3. the decision is made durable, in an order where a kill at any point resumes to the same decisions:
     every rank's loader state -> rollbacks/<n>/; rank 0 points `latest` at the target and removes the
     checkpoints after it (they hold the spike); last, rank 0 appends the record to rollbacks.jsonl (the commit
     point, with the discarded steps' metrics). Killed before the record: the resume starts from the target,
     reads the same data and sees the same spike. Killed after: the resume starts from the target with the
     recorded loader state (`SpikeGuard.resumed`), so the skipped samples are never read again;
  4. weights, optimizer, step, RNG and the detector's history come back from the target (CheckpointManager.rewind;
     a target of another layout, from before a resume that re-sliced it, is re-sliced only when an engine is
     built: the run exits 42, to be requeued, and the next launch starts from it as in step 3);
     metrics.jsonl is cut back to the target (it keeps one record per trained step; the spike's records are in
     rollbacks.jsonl); MLflow gets a `rollbacks` metric and a tag per rollback; the loop continues from the target.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Iterator

from pretrain import checkpoint, metrics
from pretrain.config import Config
from pretrain.spikes import SpikeDetector, Verdict

ROLLBACKS_FILE = "rollbacks.jsonl"
STATES_DIR = "rollbacks"  # rollbacks/<n>/rank_<r>.json: each rank's loader state after rollback n
_CALM = Verdict(None, None, False, False)


class NeedsPerson(RuntimeError):
    """The run cannot heal itself: stopped with exit 3 and a line saying why."""


class SpikeGuard:
    """The detector, the run's record of rollbacks, and the rollback itself. With `train.spike.enabled` off,
    `observe` is a constant and nothing else runs."""

    def __init__(self, cfg: Config, env: Any, ckpt: Any, say: Callable[[str], None]) -> None:
        self.cfg, self.env, self.ckpt, self.say = cfg.train.spike, env, ckpt, say
        self.grad_accum = cfg.train.grad_accum
        self.run_dir = Path(cfg.checkpoint.dir)
        self.detector = SpikeDetector(self.cfg) if self.cfg.enabled else None
        self.records: list[dict[str, Any]] = []

    # ----------------------------------------------------------------------------------------- per step

    def observe(self, step: int, res: Any) -> Verdict:
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

    def resumed(self, restored: checkpoint.Loaded | None, loader: Any) -> str | None:
        """After the start point is restored: the record of this run's rollbacks, the detector's history, and the
        loader moved past the data a rollback to this checkpoint skipped. A line to say, or None."""
        if restored is None:  # a fresh start: an earlier run's rollbacks are not this one's (no rank reads them)
            if self.env.rank == 0:
                (self.run_dir / ROLLBACKS_FILE).unlink(missing_ok=True)
                shutil.rmtree(self.run_dir / STATES_DIR, ignore_errors=True)
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
        return (f"rollback {last['rollback']} restored this checkpoint: the loader continues past the "
                f"{last['skipped_batches']} batches it skipped (steps {last['restored_step'] + 1}-"
                f"{last['detected_at']} and {last['skip_batches']} more)")

    def _loader_states(self, record: dict[str, Any]) -> list[dict[str, Any]]:
        """Every DP rank's loader state after the rollback (one rank of each DP index wrote the same stream's):
        the loader takes its own, or re-splits them when this launch has another layout."""
        from pretrain.checkpoint.resume import peer_rank

        lay = SimpleNamespace(**record["layout"])
        folder = self.run_dir / STATES_DIR / str(record["rollback"])
        return [json.loads((folder / _state_file(peer_rank(lay, d))).read_text()) for d in range(lay.dp)]

    # --------------------------------------------------------------------------------------- rollback

    def roll_back(self, step: int, verdict: Verdict, res: Any, engine: Any, loader: Any,
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
            raise NeedsPerson(f"{what}: no checkpoint from before step {first} to roll back to; the run needs a "
                              "person (a smaller checkpoint.every leaves one nearer)")
        try:
            step_dir = checkpoint.choose(self.run_dir, str(self.run_dir / checkpoint.step_dir_name(target)), env)
        except checkpoint.CheckpointError as e:
            raise NeedsPerson(f"{what}: cannot roll back: {e}") from None
        for _ in range(cfg.skip_batches * self.grad_accum):
            next(batches)
        skipped = step - target + cfg.skip_batches
        lay = env.layout
        record = {"rollback": n, "first_step": first, "detected_at": step, "restored_step": target,
                  "skipped_batches": skipped, "skip_batches": cfg.skip_batches, "loss": res.loss,
                  "grad_norm": res.grad_norm, "loss_z": verdict.loss_z, "grad_norm_z": verdict.grad_norm_z,
                  "layout": {"tp": lay.tp, "pp": lay.pp, "dp": lay.dp}}
        self._make_durable(record, loader.state_dict())
        self.records.append(record)
        record["restart"] = not self.ckpt.rewindable(step_dir)
        if record["restart"]:  # written with another layout before a resume re-sliced it: only a start re-slices
            then = f"{step_dir.name} has another layout, which only a start re-slices: restarting from it"
        else:
            loaded = self.ckpt.rewind(step_dir, engine)
            if self.detector is not None:
                self.detector.load_state_dict(loaded.rank_state["spike"])
            then = f"continuing from step {target}"
        if env.rank == 0:
            self.say(f"{what}: rollback {n} of at most {cfg.max_rollbacks}: restored {step_dir.name}; the "
                     f"{skipped} global batches read since (and skipped) are never trained on; {then} (record: "
                     f"{self.run_dir / ROLLBACKS_FILE})")
        return record

    def _target(self, first: int) -> int | None:
        before = [s for s in checkpoint.list_steps(self.run_dir) if s < first]
        return max(before) if before else None

    def _make_durable(self, record: dict[str, Any], loader_state: dict[str, Any]) -> None:
        """The order of step 3 in the module's docstring; every rank hears of a failure on any."""
        env, folder = self.env, self.run_dir / STATES_DIR / str(record["rollback"])
        failure = None
        try:
            if env.rank == 0:
                shutil.rmtree(folder, ignore_errors=True)  # a killed earlier attempt of this same rollback
                folder.mkdir(parents=True)
        except OSError as e:
            failure = e
        _agree(env, failure)
        try:
            checkpoint.atomic_write(folder / _state_file(env.rank), json.dumps(loader_state).encode())
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


def _state_file(rank: int) -> str:
    return f"rank_{rank:05d}.json"


def _agree(env: Any, failure: OSError | None) -> None:
    if env.all_reduce_max(1.0 if failure else 0.0) > 0:
        raise NeedsPerson(f"could not record the rollback: {failure or 'failed on another rank (see its log)'}")
