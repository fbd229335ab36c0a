"""benchmarks/mfu.py end to end on CPU (debug model), so the first GPU session can trust it to run."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from spawn import REPO, child_env

pytestmark = pytest.mark.slow  # each test runs benchmarks/mfu.py, which trains


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """One --work dir for the module: mfu.py makes its tokenizer and shards there once (two data-CLI processes) and
    every later run in it reuses them, as a user's repeated benchmarks do; each run replaces work/run."""
    return tmp_path_factory.mktemp("mfu_work")


def mfu(work: Path, out: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    """`python benchmarks/mfu.py --config configs/debug.yaml --vocab 1024 ARGS` in `work`, output captured."""
    return subprocess.run([sys.executable, "benchmarks/mfu.py", "--config", "configs/debug.yaml", "--vocab", "1024",
                           "--work", str(work), "--out", str(out), *args],
                          cwd=REPO, env=child_env(**env), capture_output=True, text=True, timeout=300)


def test_mfu_benchmark_measures_the_steps_after_warmup(work, tmp_path):
    out = tmp_path / "mfu.json"
    p = mfu(work, out, "--steps", "5", "--warmup", "2", "--set", "parallel.zero_stage=1")
    assert p.returncode == 0, p.stderr[-3000:]
    assert (work / "data" / "shards" / "manifest.json").is_file()  # its own shards, from the sample corpus
    r = json.loads(out.read_text())
    assert r["steps_measured"] == 3 and r["tokens_per_s"] > 0 and r["tflops_per_rank"] > 0
    assert r["mfu"] is None and r["device"] == "cpu"  # no GPU peak to divide by
    assert r["command"].startswith("python benchmarks/mfu.py") and r["commit"]
    assert not (work / "run" / "latest").exists(), "a benchmark writes no checkpoint"
    assert "measured by: python benchmarks/mfu.py" in p.stdout


def test_mfu_benchmark_writes_its_json_when_no_step_survives_the_warmup(work, tmp_path):
    """A run that ends before the warm-up is over (here: max_steps below it) still leaves its JSON, with the
    missing figures as null and the training's exit code, and says so; the commit comes from PRETRAIN_COMMIT
    where the tree has no .git (a copy on a lent GPU machine)."""
    out = tmp_path / "mfu.json"
    p = mfu(work, out, "--steps", "5", "--warmup", "3", "--set", "train.max_steps=2", PRETRAIN_COMMIT="abc123")
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["steps_measured"] == 0 and r["tokens_per_s"] is None and r["mfu"] is None
    assert r["exit_code"] == 0 and r["commit"] == "abc123"
    assert "0 step(s) after the warm-up" in p.stderr
