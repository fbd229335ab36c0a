"""Fit verdicts: every preset fits the cluster its header names, and a layout that does not is told so."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from pretrain.cli import main
from pretrain.config import load_config
from pretrain.plan.describe import estimate, fits

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
PRESETS = sorted(p.stem for p in CONFIGS.glob("*.yaml") if p.stem != "debug")


@pytest.mark.parametrize("preset", PRESETS)
def test_each_preset_fits_the_gpu_its_header_names(preset):
    header = (CONFIGS / f"{preset}.yaml").read_text().splitlines()[0]
    m = re.search(r"sized for (\d+) nodes? x (\d+) GPUs \((\w+) ", header)
    assert m, f"{preset}.yaml: header names no cluster: {header}"
    nodes, per_node, gpu = int(m.group(1)), int(m.group(2)), m.group(3)
    from pretrain.cli import _assumed_vocab
    cfg = load_config(CONFIGS / f"{preset}.yaml")
    e = estimate(cfg, nodes * per_node, _assumed_vocab(cfg.model.flavor)[0])
    assert fits(e, gpu), f"{preset}: ~{e.total / 2**30:.1f} GiB per rank does not fit {gpu}"


def test_a_layout_that_does_not_fit_says_by_how_much(capsys):
    """8b, micro-batch 4, one node of H100s: the planner must not call it simply valid."""
    assert main(["plan", "--config", "configs/8b.yaml", "--nodes", "1", "--set", "train.micro_batch_size=4",
                 "--set", "model.activation_checkpointing=none"]) == 0
    out = capsys.readouterr().out
    verdict = next(line for line in out.splitlines() if "FIT" in line)
    assert verdict.startswith("DOES NOT FIT H100") and " over (" in verdict
    assert "do not fit H100 memory" in out.splitlines()[-1]
