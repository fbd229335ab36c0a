"""Layout ranking: its arithmetic against published anchors, and what `pretrain plan --gpu` prints."""
from __future__ import annotations

import pytest

from pretrain.cli import main
from pretrain.config import load_config
from pretrain.parallel.describe import Links, estimate, model_states, step_time


@pytest.mark.parametrize("zero, gb", [(0, 120.0), (1, 31.4), (2, 16.6), (3, 1.9)])
def test_zero_paper_figure_1(zero, gb):
    """Rajbhandari et al. 2020, Figure 1: 7.5B parameters, 64 DP ranks, fp16 weights and gradients (2 + 2 bytes),
    K = 12 bytes of Adam state: 120 / 31.4 / 16.6 / 1.9 GB per device for baseline / P_os / P_os+g / P_os+g+p."""
    assert sum(model_states(7.5e9, 64, zero, 2, 2, 12)) / 1e9 == pytest.approx(gb, rel=0.02)


def test_pipeline_bubble_is_megatrons():
    """Narayanan et al. 2021 (section 2.2.1): the 1F1B bubble is (p - 1)/m of the ideal time. With free links,
    pp = 4 over m = 8 micro-batches takes (m + p - 1)/m of pp = 1's time for the same work per GPU."""
    links = Links(nvlink=1e12, ib=1e12)
    base = ["model.vocab_size=32000", "train.dtype=bf16", "parallel.zero_stage=1", "train.micro_batch_size=1",
            "train.seq_len=2048", "model.flavor=7b"]
    flat = load_config(None, base + ["train.grad_accum=8"])
    piped = load_config(None, base + ["train.grad_accum=8", "parallel.pp=4"])
    t1 = step_time(flat, estimate(flat, 1), 989, 0.5, 8, links)
    t4 = step_time(piped, estimate(piped, 4), 989, 0.5, 8, links)
    assert t4 * 4 / t1 == pytest.approx((8 + 4 - 1) / 8, rel=1e-3)


def test_tensor_parallel_across_nodes_costs_infiniband_time():
    cfg = load_config(None, ["model.flavor=7b", "model.vocab_size=32000", "train.dtype=bf16", "parallel.zero_stage=1",
                             "parallel.tp=8", "train.seq_len=4096", "train.micro_batch_size=1"])
    e = estimate(cfg, 8)
    inside, across = (step_time(cfg, e, 989, 0.5, gpn, Links()) for gpn in (8, 4))
    assert across > 1.5 * inside


def test_plan_lists_fitting_layouts_fastest_first(capsys):
    assert main(["plan", "--config", "configs/8b.yaml", "--nodes", "8", "--gpu", "H100", "--top", "5"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert any(line.startswith("fits H100") for line in out)
    start = next(i for i, line in enumerate(out) if "fitting layouts, fastest first" in line)
    rows = [line.split() for line in out[start + 2:start + 7]]
    times = [float(r[5]) for r in rows]
    assert times == sorted(times) and all(float(r[7]) < 79.2 * 0.9 for r in rows)
