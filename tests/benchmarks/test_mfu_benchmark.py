"""benchmarks/mfu.py end to end on CPU (debug model), so the first GPU session can trust it to run."""
from __future__ import annotations

import json
import subprocess
import sys

from spawn import REPO, child_env


def test_mfu_benchmark_measures_the_steps_after_warmup(tmp_path):
    out = tmp_path / "mfu.json"
    p = subprocess.run([sys.executable, "benchmarks/mfu.py", "--config", "configs/debug.yaml", "--steps", "5",
                        "--warmup", "2", "--vocab", "1024", "--work", str(tmp_path), "--out", str(out),
                        "--set", "parallel.zero_stage=1"],
                       cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["steps_measured"] == 3 and r["tokens_per_s"] > 0 and r["tflops_per_rank"] > 0
    assert r["mfu"] is None and r["device"] == "cpu"  # no GPU peak to divide by
    assert r["command"].startswith("python benchmarks/mfu.py") and r["commit"]
    assert not (tmp_path / "run" / "latest").exists(), "a benchmark writes no checkpoint"
    assert "measured by: python benchmarks/mfu.py" in p.stdout


def test_mfu_benchmark_writes_its_json_when_no_step_survives_the_warmup(tmp_path):
    """A run that ends before the warm-up is over (here: max_steps below it) still leaves its JSON, with the
    missing figures as null and the training's exit code, and says so; the commit comes from PRETRAIN_COMMIT
    where the tree has no .git (a copy on a lent GPU machine)."""
    out = tmp_path / "mfu.json"
    p = subprocess.run([sys.executable, "benchmarks/mfu.py", "--config", "configs/debug.yaml", "--steps", "5",
                        "--warmup", "3", "--vocab", "1024", "--work", str(tmp_path), "--out", str(out),
                        "--set", "train.max_steps=2"],
                       cwd=REPO, env=child_env(PRETRAIN_COMMIT="abc123"), capture_output=True, text=True, timeout=300)
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["steps_measured"] == 0 and r["tokens_per_s"] is None and r["mfu"] is None
    assert r["exit_code"] == 0 and r["commit"] == "abc123"
    assert "0 step(s) after the warm-up" in p.stderr
