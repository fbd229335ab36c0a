"""Every name under `checkpoint.dir`, in one table: what a run directory holds and what each step directory holds.

A run directory:

    latest                  the committed step to resume from: one line, `step_<n>` (checkpoint/commit.py)
    step_<n>/               a committed checkpoint (below); `.tmp_step_<n>/` while it is being written
    run.lock, run.lock.guard   one launch per directory (checkpoint/run_lock.py)
    metrics.jsonl           one record per optimizer step (telemetry/metrics.py)
    segments.jsonl          one line per launch: its steps and wall time; summary.json at the end (train/step_log.py)
    rollbacks.jsonl         loss-spike rollbacks (train/rollback.py)
    rollbacks/<n>/rank_<r>.json   each rank's loader state after rollback n
    profiles/               torch.profiler traces (train/profiling.py)
    hangs/<stamp>-step_<n>/rank_<r>.txt  each rank's thread stacks when no step completed in time; summary.txt
                            names the ranks not in the collective the others wait in (train/watchdog.py)
    mlruns/mlflow.db        the local MLflow store when no tracking URI is given (telemetry/tracking.py)
    hf/step_<n>/            the Hugging Face export of `train.register_as` (telemetry/model_registry.py)
    evals/step_<n>.json     downstream scores of `pretrain eval` on that step; evals/lm_eval/ lm-eval's own
                            output (pretrain/eval/)

A step directory (`step_<n>/`):

    manifest.json           every file's size and sha256, written last: a step without it is not committed
    meta.json               step, MLflow run id, tokenizer identity, the resolved run
    config.yaml             the config that trained it
    tokenizer/              a copy of the tokenizer, so the step is self-contained
    model/                  DeepSpeed's files (its checkpoint tag)
    weights/                an imported checkpoint's reference-named safetensors instead (pretrain import-hf)
    rank_<r>.pt             each rank's loader cursor and RNG states
    .digests/               while being written: each rank's sha256 of its files, for the manifest
"""
from __future__ import annotations

import re

# the run directory
LATEST = "latest"
LOCK_FILE = "run.lock"
GUARD_FILE = "run.lock.guard"
METRICS_FILE = "metrics.jsonl"
SEGMENTS_FILE = "segments.jsonl"
SUMMARY_FILE = "summary.json"
ROLLBACKS_FILE = "rollbacks.jsonl"
ROLLBACK_STATES_DIR = "rollbacks"
PROFILE_DIR = "profiles"
HANGS_DIR = "hangs"
HANG_SUMMARY = "summary.txt"
MLFLOW_DIR = "mlruns"
MLFLOW_DB = "mlflow.db"
HF_EXPORTS_DIR = "hf"
EVALS_DIR = "evals"
LM_EVAL_OUTPUT = "lm_eval"  # under EVALS_DIR
TEMP_PREFIX = ".tmp_"  # + a step directory's name, while that step is written
STEP_RE = re.compile(r"^step_(\d+)$")

# a step directory
MANIFEST = "manifest.json"
META = "meta.json"
CONFIG = "config.yaml"
TOKENIZER_DIR = "tokenizer"
MODEL_DIR = "model"
IMPORTED_WEIGHTS = "weights"
DIGESTS = ".digests"


def step_dir_name(step: int) -> str:
    return f"step_{step}"


def rank_file(rank: int) -> str:
    return f"rank_{rank:05d}.pt"


def rollback_state_file(rank: int) -> str:
    """In `rollbacks/<n>/`: the rank's loader state after rollback n."""
    return f"rank_{rank:05d}.json"


def hang_dir_name(stamp: str, step: int) -> str:
    """In `hangs/`: one hang, the same name on every rank (the launch's stamp, agreed at start, and the step)."""
    return f"{stamp}-{step_dir_name(step)}"


def hang_stack_file(rank: int) -> str:
    return f"rank_{rank:05d}.txt"
