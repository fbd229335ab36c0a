"""Rank 0's record of the run, step by step: metrics.jsonl, the MLflow buffer, a progress bar or log lines; one
line per launch in segments.jsonl; summary.json and the closing lines that say where every output went.

Checkpoint figures: a save commits in the background, steps after the one it saved, so its pause, duration, size
and speed (`ckpt_*`) go on the record of the first step after its commit was seen, with `ckpt_step` naming the
save. The last save of a launch (the final one, or a stop's; and the one before it when that was still being
written) has no step record after it: its figures go to MLflow at the step it saved and, for a finished run, to
summary.json (`final_saves`). A resume's load time (`ckpt_load_s`) goes on the launch's first record."""
from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

from pretrain.checkpoint.commit import PendingSave, gb_per_s
from pretrain.config import Config
from pretrain.console import say
from pretrain.model.flops import flops_per_token
from pretrain.run.distributed import DistEnv
from pretrain.run.paths import LATEST, METRICS_FILE, SEGMENTS_FILE, SUMMARY_FILE
from pretrain.run.resolved import ResolvedRun
from pretrain.telemetry import metrics
from pretrain.telemetry.tracking import Tracker, step_values, ui_hint
from pretrain.train.hooks import Observer, StepReport


class StepLog(Observer):
    """Rank 0's outputs per step: metrics.jsonl, MLflow buffer, and a progress bar or plain log lines; per
    segment (one launch: a requeue or resume starts the next), a line in segments.jsonl; at the end summary.json."""

    def __init__(self, cfg: Config, run: ResolvedRun, env: DistEnv, tracker: Tracker | None, start: int,
                 load_s: float | None = None) -> None:
        """`load_s`: how long the resume's checkpoint took to load (None: not a resume)."""
        self.cfg, self.env, self.tracker, self.start = cfg, env, tracker, start
        self.load_s = load_s
        self.saves: list[PendingSave] = []  # committed, not yet on a record
        self.on = env.rank == 0
        tokens_per_step = run.tokens_per_step
        self.meter = metrics.Meter(flops_per_token=flops_per_token(run.model, run.seq_len,
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
        self.profiles: Path | None = None  # set when a profile is asked for (pretrain/train/profiling.py)
        self.skipped = 0
        self.t0 = time.time()
        self.at = start  # the last step this segment ran
        self.segments = Path(cfg.checkpoint.dir) / SEGMENTS_FILE
        if self.on and start == 0 and any(seg["end_step"] > 0 for seg in self._segments()):
            # A fresh start: earlier segments belong to another run. Ones that ended before their first step
            # (stopped while starting, then requeued) are this run's beginning and stay.
            self.segments.unlink()

    def after_step(self, report: StepReport) -> None:
        step, res, val, verdict = report.step, report.result, report.val, report.verdict
        rec = self.meter.record(step, float(res.loss), float(res.lr), float(res.grad_norm), bool(res.skipped),
                                data_wait_s=getattr(res, "data_wait_s", None))
        if verdict is not None:
            rec.loss_z, rec.grad_norm_z = verdict.loss_z, verdict.grad_norm_z
        rec.rollbacks = report.rollbacks
        rec.z_loss = res.z_loss
        if val is not None:
            rec.val_loss, rec.val_ppl, rec.val_bpb = val.loss, math.exp(min(val.loss, 50.0)), val.bpb
        rec.downstream = report.downstream
        if (slow := report.straggler) is not None:
            rec.straggler_rank, rec.straggler_host, rec.straggler_ratio = slow.rank, slow.host, slow.ratio
            rec.compute_median_s = slow.median_s
        rec.ckpt_load_s, self.load_s = self.load_s, None
        if self.saves:
            for key, value in save_fields(self.saves.pop(0)).items():
                setattr(rec, key, value)
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

    def after_save(self, step: int) -> None:
        self.meter.restart_clock()  # a checkpoint's time is not a step's time

    def after_commit(self, save: PendingSave) -> None:
        self.saves.append(save)  # on the next record (the module docstring says why not on its own step's)

    def after_rollback(self, record: dict[str, Any]) -> None:
        """metrics.jsonl cut back to the restored step (the discarded records are in rollbacks.jsonl), MLflow
        told."""
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

    def close(self) -> None:
        """End of this segment however it ends (done, stopped, aborted, failed): appended to segments.jsonl."""
        if self.bar is not None:
            self.bar.close()
        if self.on and self.tracker and self.saves:  # the launch's last save: no step record comes after it
            for save in self.saves:  # at the step it saved: flushing further would send steps no checkpoint holds
                self.tracker.log_step(save.step, step_values(save_fields(save)))
            self.tracker.flush(up_to=max(save.step for save in self.saves))
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
                   "metrics": str(run_dir / METRICS_FILE)}
        if self.saves:  # committed after the last step record (the final save; its predecessor if still writing)
            summary["final_saves"] = [save_fields(save) for save in self.saves]
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


def save_fields(save: PendingSave) -> dict[str, Any]:
    """A committed save as the ckpt_* fields of a metrics.jsonl record (telemetry/metrics.py says what each is)."""
    return {"ckpt_step": save.step, "ckpt_pause_s": save.blocked_s, "ckpt_save_s": save.total_s,
            "ckpt_bytes": save.bytes, "ckpt_gbps": gb_per_s(save.bytes, save.total_s)}


def append_segment(run_dir: Path, start: int, end: int, t0: float) -> None:
    """One launch of the run in segments.jsonl: the steps it ran (none when stopped while starting), its wall time."""
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / SEGMENTS_FILE, "a") as f:
        f.write(json.dumps({"start_step": start, "end_step": end,
                            "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(t0)),
                            "wall_s": round(time.time() - t0, 3)}) + "\n")


def _latest(run_dir: Path) -> str | None:
    latest = run_dir / LATEST
    return str(run_dir / latest.read_text().strip()) if latest.exists() else None
