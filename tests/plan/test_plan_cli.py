"""`pretrain plan` before any data exists: the vocabulary it assumes and says, and what it then prints."""
from __future__ import annotations

import pytest

from pretrain.cli import main


def plan(capsys, *args: str) -> str:
    assert main(["plan", *args]) == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("preset, vocab, params, why", [
    ("8b", 128256, "8,030,261,248 (8.030 B)", "the 8b flavor's LLaMA-3 tokenizer"),   # Meta: 8.03B
    ("7b", 32000, "6,738,415,616 (6.738 B)", "the 7b flavor's LLaMA-2 tokenizer"),    # Meta: 6.74B
    ("125m", 32000, "", "the 125m flavor names no tokenizer"),
])
def test_plan_without_data_takes_the_flavors_vocabulary_and_says_so(capsys, preset, vocab, params, why):
    out = plan(capsys, "--config", f"configs/{preset}.yaml", "--nodes", "1", "--set", "parallel.tp=1")
    assert f"assuming a {vocab}-token vocabulary ({why}" in out
    assert f"vocab={vocab} (padded)" in out and params in out


def test_an_explicit_vocabulary_wins_over_the_flavors(capsys):
    out = plan(capsys, "--config", "configs/8b.yaml", "--nodes", "1", "--set", "model.vocab_size=32000")
    assert "assuming" not in out and "vocab=32000 (padded)" in out


def test_plan_prints_the_host_memory_background_saves_keep(capsys):
    """1b, ZeRO-2 bf16 on one node of 8: each rank writes its bf16 weights (2 bytes a parameter) and its eighth of
    the fp32 master and Adam moments (12 / 8); background saves stage that much host memory per rank, exactly."""
    out = plan(capsys, "--config", "configs/1b.yaml", "--nodes", "1", "--gpus-per-node", "8")
    params = 1_235_814_400
    per_rank = params * 2 + params * 12 / 8
    line = next(x for x in out.splitlines() if x.startswith("checkpoint:"))
    assert f"~{per_rank / 2**30:.2f} GiB written per rank" in line
    assert f"at most {per_rank * 8 / 2**30:.2f} GiB per node of 8" in line and "pinned on CUDA" in line
    out = plan(capsys, "--config", "configs/1b.yaml", "--nodes", "1", "--set", "checkpoint.background=false")
    assert "no host copy is kept" in out
