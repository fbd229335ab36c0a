"""The per-step record: what is printed, sent to MLflow and appended to `<checkpoint.dir>/metrics.jsonl`.

metrics.jsonl is the run's ground truth without a tracking server: one JSON object per optimizer step, floats
written with `json` (shortest repr that round-trips, i.e. full precision), so two runs can be compared bitwise.
On resume the file is cut back to the resumed step, so it never holds a step twice.

MFU (the headline, logged as `mfu`) follows PaLM (Chowdhery et al. 2022, appendix B), as torchtitan and
llm-foundry count it: model FLOPs per token = 6*N + 12*L*H*Q*T, with N the parameters that take part in a
matmul (every block weight and the output head, V*D, counted even when tied to the embedding because the head
matmul runs; the embedding lookup is a gather and is not counted), L layers, H query heads, Q head dim, T
sequence length; 12*L*H*Q*T is attention's QK^T and AV, forward + backward, over the full T x T square.
Megatron-LM (Narayanan et al. 2021) counts the same matmuls but halves attention for a causal mask
(`causal=True`: 6*N + 6*L*H*Q*T): on LLaMA-2 7B at T=4096 that reads 7% lower, at 8B / T=8192 11% lower.
Recomputation is never counted (that would be hardware FLOPs, not model FLOPs).
MFU = achieved model FLOP/s per device / the device's dense bf16 peak.
"""
from __future__ import annotations

import json
import math
import os
import resource
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pretrain.plan.hardware import peak_tflops_for
from pretrain.run.paths import METRICS_FILE


def device_peak_tflops(override: float | None = None) -> float | None:
    """Per-device peak for MFU: the config's value, else looked up by GPU name; None on CPU or unknown GPU."""
    if override is not None:
        return override
    import torch  # here, not at the top: `pretrain plan` reads the FLOPs formula and the peak table without torch

    if not torch.cuda.is_available():
        return None
    return peak_tflops_for(torch.cuda.get_device_name())


def peak_memory_gib() -> float:
    """Peak allocated GPU memory on CUDA; on CPU the process's max resident set size."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (2**30 if sys.platform == "darwin" else 2**20)


@dataclass
class StepRecord:
    step: int
    loss: float
    lr: float
    grad_norm: float
    skipped: bool
    tokens: int            # tokens trained so far, all ranks
    step_time_s: float
    tokens_per_s: float    # all ranks
    tflops: float          # model TFLOP/s per device
    mfu: float | None      # None where the peak is unknown (CPU)
    peak_mem_gib: float
    z_loss: float | None = None        # train.z_loss: mean over tokens of coefficient x log(Z)^2, the term trained
                                       # on beside `loss` (the cross-entropy): the objective is loss + z_loss
    val_loss: float | None = None
    val_ppl: float | None = None
    val_bpb: float | None = None       # held-out bits per byte: comparable across tokenizers
    data_wait_s: float | None = None   # of step_time_s: waiting for the loader's micro-batches (this rank)
    mem_allocated_gib: float | None = None  # CUDA: the caching allocator's allocated and reserved memory now
    mem_reserved_gib: float | None = None
    eta_s: float | None = None         # to train.max_steps at the recent pace
    loss_z: float | None = None        # train.spike: the step's robust z-scores (pretrain/train/spikes.py)
    grad_norm_z: float | None = None
    rollbacks: int | None = None       # train.spike: rollbacks taken so far (rollbacks.jsonl has each one)
    straggler_rank: int | None = None  # logged steps, world > 1: the rank with the longest compute time,
    straggler_host: str | None = None  # its host, its ratio to the median rank's (pretrain/train/stragglers.py)
    straggler_ratio: float | None = None
    compute_median_s: float | None = None
    downstream: dict[str, float] | None = None  # eval.tasks: "<task>/<metric>" -> value, and "time_share"
    # A save commits in the background, steps after it started: its figures land on the record of the first step
    # after the commit was seen (ckpt_step says which save); the final save's to summary.json and MLflow only.
    ckpt_step: int | None = None       # the step that save checkpointed
    ckpt_pause_s: float | None = None  # training held up by it: the host copy, and any later wait for its commit
    ckpt_save_s: float | None = None   # the whole save, from the call to the commit
    ckpt_bytes: int | None = None      # what it wrote, all ranks' files (the step directory's size)
    ckpt_gbps: float | None = None     # ckpt_bytes / ckpt_save_s, in GB/s (10^9 bytes)
    ckpt_load_s: float | None = None   # first record after a resume: choosing, verifying and loading its checkpoint

    def to_json(self) -> str:
        d = {k: (None if isinstance(v, float) and not math.isfinite(v) and k not in ("loss", "grad_norm") else v)
             for k, v in asdict(self).items()}
        # A non-finite loss stays visible as the string "nan"/"inf" (JSON has no NaN literal).
        for k in ("loss", "grad_norm"):
            if isinstance(d[k], float) and not math.isfinite(d[k]):
                d[k] = str(d[k])
        return json.dumps(d)

    def line(self) -> str:
        """The human log line."""
        mfu = f" mfu {100 * self.mfu:.1f}%" if self.mfu is not None else ""
        val = f" | val_loss {self.val_loss:.4f} ppl {self.val_ppl:.2f}" if self.val_loss is not None else ""
        val += f" bpb {self.val_bpb:.4f}" if self.val_bpb is not None else ""
        skip = " (skipped: non-finite)" if self.skipped else ""
        skip += f" | z_loss {self.z_loss:.3e}" if self.z_loss is not None else ""
        eta = f" | eta {_duration(self.eta_s)}" if self.eta_s is not None else ""
        return (f"step {self.step} | loss {self.loss:.4f}{skip} | lr {self.lr:.3e} | grad_norm {self.grad_norm:.3f}"
                f" | {self.tokens_per_s:,.0f} tok/s | {self.tflops:.3g} TFLOP/s{mfu} | mem {self.peak_mem_gib:.2f} GiB"
                f"{val}{eta}")


def _duration(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class Meter:
    """Turns (step result, wall time) into StepRecords; tokens per step fixed by the layout."""

    def __init__(self, *, flops_per_token: float, tokens_per_step: int, world_size: int,
                 peak_tflops: float | None, start_tokens: int = 0, max_steps: int | None = None) -> None:
        self.fpt, self.tokens_per_step, self.world = flops_per_token, tokens_per_step, world_size
        self.peak = peak_tflops
        self.tokens = start_tokens
        self.max_steps = max_steps
        self._recent: list[float] = []  # the last step times, for the ETA
        self._t = time.perf_counter()

    def restart_clock(self) -> None:
        self._t = time.perf_counter()

    def record(self, step: int, loss: float, lr: float, grad_norm: float, skipped: bool,
               data_wait_s: float | None = None) -> StepRecord:
        now = time.perf_counter()
        dt, self._t = max(now - self._t, 1e-9), now
        self.tokens += self.tokens_per_step
        tps = self.tokens_per_step / dt
        tflops = tps * self.fpt / self.world / 1e12
        self._recent = (self._recent + [dt])[-20:]
        eta = None
        if self.max_steps is not None:
            eta = sorted(self._recent)[len(self._recent) // 2] * max(self.max_steps - step, 0)
        import torch

        cuda = torch.cuda.is_available()
        return StepRecord(step=step, loss=loss, lr=lr, grad_norm=grad_norm, skipped=skipped, tokens=self.tokens,
                          step_time_s=dt, tokens_per_s=tps, tflops=tflops,
                          mfu=(tflops / self.peak) if self.peak else None, peak_mem_gib=peak_memory_gib(),
                          data_wait_s=data_wait_s,
                          mem_allocated_gib=torch.cuda.memory_allocated() / 2**30 if cuda else None,
                          mem_reserved_gib=torch.cuda.memory_reserved() / 2**30 if cuda else None, eta_s=eta)


class MetricsFile:
    """Append-only metrics.jsonl (rank 0), line-buffered so a killed run keeps every finished step."""

    def __init__(self, run_dir: str | Path) -> None:
        self.path = Path(run_dir) / METRICS_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(self.path, "a", buffering=1)

    def append(self, rec: StepRecord) -> None:
        self._f.write(rec.to_json() + "\n")

    def close(self) -> None:
        self._f.close()


def truncate_after(run_dir: str | Path, step: int) -> int:
    """Drop records with step > `step` (they belong to the lost tail of an interrupted run); returns how many.

    Written to a temp file and renamed, so a crash here cannot lose the records that are kept.
    """
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            rec_step = json.loads(line)["step"]
        except (ValueError, KeyError):
            dropped += 1  # a half-written last line of a killed run
            continue
        if rec_step <= step:
            kept.append(line)
        else:
            dropped += 1
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text("".join(k + "\n" for k in kept))
    os.replace(tmp, path)
    return dropped


def read(run_dir: str | Path) -> list[dict[str, Any]]:
    """Every record of the run's metrics.jsonl; none before its first step has been logged."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
