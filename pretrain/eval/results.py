"""lm-eval's results as this project records them: flat "<task>/<metric>" numbers for metrics.jsonl and MLflow,
and `<run>/evals/step_<N>.json` for `pretrain eval`."""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from pretrain.run.paths import EVALS_DIR, STEP_RE, step_dir_name

_UNSAFE = re.compile(r"[^A-Za-z0-9_\-./ ]")  # MLflow's metric-name alphabet


def flat_scores(results: dict[str, Any]) -> dict[str, float]:
    """{"results": {task: {"acc,none": 0.5, "acc_stderr,none": 0.1, "alias": ...}}} -> {"task/acc": 0.5,
    "task/acc_stderr": 0.1}; a filter other than lm-eval's "none" stays in the name ("exact_match_strict-match")."""
    out: dict[str, float] = {}
    for task, values in (results.get("results") or {}).items():
        for key, value in values.items():
            if not isinstance(value, (int, float)) or isinstance(value, bool) or "," not in key:
                continue
            metric, filt = key.split(",", 1)
            name = metric if filt == "none" else f"{metric}_{filt}"
            out[_UNSAFE.sub("_", f"{task}/{name}")] = float(value)
    return out


def evals_dir(step_dir: Path) -> Path:
    """`<run>/evals` for a training checkpoint `<run>/step_<N>`; for an imported or averaged one, whose directory
    may hold no file its manifest does not list, `<its parent>/evals/<its name>`."""
    step_dir = step_dir.resolve()
    if STEP_RE.match(step_dir.name):
        return step_dir.parent / EVALS_DIR
    return step_dir.parent / EVALS_DIR / step_dir.name


def write_step_results(step_dir: Path, step: int, record: dict[str, Any]) -> Path:
    """`evals/step_<N>.json`, written to a temporary name and renamed (a reader never sees half a file)."""
    out = evals_dir(step_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{step_dir_name(step)}.json"
    tmp = path.with_suffix(f".json.tmp{os.getpid()}")
    tmp.write_text(json.dumps(record, indent=2, default=str) + "\n")
    os.replace(tmp, path)
    return path
