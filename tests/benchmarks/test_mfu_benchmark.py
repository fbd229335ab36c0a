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
