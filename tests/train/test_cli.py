"""`pretrain train --dry-run`, `pretrain plan` and bad-config exits: the user's first contact with a config."""
from __future__ import annotations

import subprocess
import sys

import pytest

from spawn import REPO, child_env


def pretrain(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pretrain", *args], cwd=REPO, env=child_env(),
                          capture_output=True, text=True, timeout=120)


def test_dry_run_prints_layout_params_memory_and_builds_nothing(tmp_path):
    from train_common import tiny_shards

    shards = tiny_shards(tmp_path / "data") / "shards"
    run_dir = tmp_path / "run"
    p = pretrain("train", "--config", "configs/debug.yaml", "--dry-run", "--world-size", "4",
                 "--set", f"data.path={shards}", "--set", "model.vocab_size=1000", "--set", "parallel.tp=2",
                 "--set", "parallel.zero_stage=1", "--set", f"checkpoint.dir={run_dir}")
    assert p.returncode == 0, p.stderr
    assert "world=4 = tp 2 x pp 1 x dp 2" in p.stdout
    assert "vocab=1024 (padded)" in p.stdout  # 128 x tp rule
    assert "per-rank memory estimate" in p.stdout
    assert not run_dir.exists(), "a dry run must not create the run directory"


@pytest.mark.parametrize("override, message", [
    ("parallel.tp=3", "world size 2 is not divisible by tp x pp = 3 x 1"),
    ("train.max_stepz=3", "unknown key 'train.max_stepz' (did you mean 'max_steps'?)"),
    ("parallel.pp=2", "ZeRO-2 and ZeRO-3 are incompatible with pipeline parallelism"),
    ("data.weights=[0]", "data.weights [0.0]: token shares must be >= 0 and not all zero"),  # was: at start
])
def test_bad_config_is_one_line_and_exit_2(override, message):
    p = pretrain("train", "--config", "configs/debug.yaml", "--dry-run", "--world-size", "2",
                 "--set", "model.vocab_size=1000", "--set", override)
    assert p.returncode == 2
    assert message in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1, p.stderr


def test_missing_shards_named_in_one_line(tmp_path):
    p = pretrain("train", "--config", "configs/debug.yaml", "--dry-run", "--set", f"data.path={tmp_path}/nope")
    assert p.returncode == 2 and f"data.path: {tmp_path}/nope does not exist" in p.stderr


@pytest.mark.parametrize("preset, nodes", [("125m", 1), ("350m", 1), ("1b", 2), ("3b", 4), ("7b", 4), ("8b", 8),
                                           ("13b", 8), ("70b", 32)])
def test_presets_resolve_on_their_cluster(preset, nodes):
    from pretrain.cli import main
    assert main(["plan", "--config", f"configs/{preset}.yaml", "--nodes", str(nodes),
                 "--set", "model.vocab_size=32000"]) == 0


def test_vocab_smaller_than_the_tokenizer_is_refused(tmp_path):
    """Token ids past the embedding would fail on one rank and be silently zeroed on vocab-parallel ranks."""
    from train_common import tiny_shards

    shards = tiny_shards(tmp_path / "data") / "shards"
    p = pretrain("train", "--config", "configs/debug.yaml", "--dry-run", "--set", f"data.path={shards}",
                 "--set", "model.vocab_size=100")
    assert p.returncode == 2
    assert "model.vocab_size=100 is smaller than the tokenizer's" in p.stderr and str(shards) in p.stderr


def test_plan_without_data_states_its_vocabulary_assumption():
    p = pretrain("plan", "--config", "configs/7b.yaml", "--nodes", "4", "--gpus-per-node", "8")
    assert p.returncode == 0, p.stderr
    assert "assuming a 32000-token vocabulary" in p.stdout and "world=32" in p.stdout


def test_plan_predicts_throughput_from_the_assumed_mfu():
    """tokens/s x model FLOPs per token = MFU x peak x GPUs: the prediction is the PaLM arithmetic, stated."""
    import re

    from pretrain.config import load_config
    from pretrain.model.flops import flops_per_token
    from pretrain.plan.describe import estimate

    p = pretrain("plan", "--config", "configs/8b.yaml", "--nodes", "8", "--gpus-per-node", "8", "--gpu", "A100",
                 "--mfu", "0.5", "--set", "model.vocab_size=128256")
    assert p.returncode == 0, p.stderr
    line = next(x for x in p.stdout.splitlines() if x.startswith("throughput"))
    tokens_per_s = float(re.search(r"MFU of 312 TFLOP/s per GPU: ([\d,]+) tokens/s", line).group(1).replace(",", ""))
    cfg = load_config("configs/8b.yaml", ["model.vocab_size=128256"])
    e = estimate(cfg, 64, 128256)
    assert tokens_per_s * flops_per_token(e.args, cfg.train.seq_len, 128256) == pytest.approx(0.5 * 312e12 * 64,
                                                                                              rel=1e-5)
    bad = pretrain("plan", "--config", "configs/8b.yaml", "--gpu", "B300")
    assert bad.returncode == 2 and bad.stdout == "" and "--gpu B300: unknown GPU" in bad.stderr


def test_both_clis_exit_2_on_the_same_bad_input(tmp_path):
    """A directory that holds no shards: `pretrain-data verify` and `pretrain train` say so in one line, exit 2."""
    data = subprocess.run([sys.executable, "-m", "data_pipeline", "verify", str(tmp_path)], cwd=REPO,
                          env=child_env(), capture_output=True, text=True, timeout=120)
    train = pretrain("train", "--config", "configs/debug.yaml", "--dry-run", "--set", f"data.path={tmp_path}")
    assert (data.returncode, train.returncode) == (2, 2), (data.stderr, train.stderr)
    for p in (data, train):
        assert str(tmp_path) in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
