"""The planner under context parallelism (parallel.cp): the per-rank formula against what one CP rank holds, the
all-to-all in the step time, cp in the layout ranking and in the layout line, and the long-context preset's header
against what `pretrain plan` prints for it. The saved bytes as measured on 2 CP ranks: test_measured.py."""
from __future__ import annotations

import re
import shlex
import sys
from pathlib import Path

import pytest

from pretrain.cli import main
from pretrain.config import ConfigError, load_config
from pretrain.model.args import FLAVORS
from pretrain.plan.describe import (GiB, Kernels, all_to_all_bytes, block_activations, estimate, planned_run,
                                    rank_layouts, step_time)
from pretrain.plan.fit import check_memory
from pretrain.plan.hardware import Links

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "train"))
from train_common import tiny_shards  # noqa: E402

PRESET = Path(__file__).resolve().parents[2] / "configs" / "1b-32k.yaml"
VOCAB_1B = 128256  # what `plan` assumes for the 1b flavor (LLaMA-3's tokenizer)


def preset(*overrides: str):
    return load_config(PRESET, [f"model.vocab_size={VOCAB_1B}", *overrides])


@pytest.mark.parametrize("kv_heads", [8, 1], ids=["kv-split", "kv-repeated"])
def test_one_cp_rank_holds_a_quarter_of_the_tokens_and_wo_keeps_its_own_input(kv_heads):
    """1b at 32768 tokens, cp=4: selective keeps the same tensors as cp=1 does for 8192 tokens (the all-to-alls are
    re-run, not kept); without recompute the output all-to-all's result, which wo saves, comes on top; a single kv
    head (multi-query) is repeated 4 times before the exchange, so attention saves k and v 4 heads wide."""
    args, T, k = FLAVORS["1b"].replace(vocab_size=VOCAB_1B, n_kv_heads=kv_heads), 32768, Kernels()
    sel = block_activations(args, T, 1, False, "selective", 2, k, cp=4)[0]
    assert sel == block_activations(args, T // 4, 1, False, "selective", 2, k)[0]
    none4, none1 = (block_activations(args, n, 1, False, "none", 2, k, cp=c)[0] for n, c in ((T, 4), (T // 4, 1)))
    repeated_kv = 2 * (T // 4) * args.head_dim * 2 * (4 - 1) if kv_heads == 1 else 0  # k and v, 3 more copies
    assert none4 == none1 + (T // 4) * args.dim * 2 + repeated_kv
    assert block_activations(args, T, 1, False, "full", 2, k, cp=4)[0] == (T // 4) * args.dim * 2


def test_zero_partitions_over_dp_times_cp():
    """The 1b-32k layout: dp 2 x cp 4 = 8 ranks share each ZeRO-2 partition, as dp 8 at cp=1 does."""
    cp4, cp1 = estimate(preset(), 8), estimate(preset("parallel.cp=1", "train.grad_accum=4"), 8)
    assert (cp4.layout.dp, cp4.layout.weight_replicas) == (2, 8)
    assert (cp4.weights, cp4.grads, cp4.optimizer) == (cp1.weights, cp1.grads, cp1.optimizer)
    assert cp4.activations < cp1.activations / 3


def test_all_to_all_time_in_the_step():
    """Free links: cp=4 (dp 2, accum 16) takes the time of cp=1 (dp 8, accum 4), the same work per GPU. Real links:
    the all-to-all (4 tensors forward, 4 backward, 4 re-run under selective recompute, (cp-1)/cp of each) adds its
    bytes over NVLink, and more over InfiniBand when the CP group leaves the node."""
    cp4, cp1 = preset(), preset("parallel.cp=1", "train.grad_accum=4")
    e4, e1 = estimate(cp4, 8), estimate(cp1, 8)
    free = Links(nvlink=1e12, ib=1e12)
    assert step_time(cp4, e4, 989, 0.5, 8, free) == pytest.approx(step_time(cp1, e1, 989, 0.5, 8, free), rel=1e-4)
    args = e4.args
    per_block = all_to_all_bytes(args, 32768, 1, 4, 2)
    assert per_block == 3 / 4 * 8192 * (2 * 32 + 2 * 8) * args.head_dim * 2  # q, out: 32 heads; k, v: 8
    links = Links()
    extra = step_time(cp4, e4, 989, 0.5, 8, links) - step_time(cp4, e4, 989, 0.5, 8, Links(nvlink=1e12))
    dp_bytes = 7 / 8 * e4.params * (4 + 2)  # ZeRO-2 over dp x cp = 8: reduce-scatter + all-gather (tied head)
    all_to_all = 16 * 16 * 3 * per_block  # micro-batches x blocks x (fwd, bwd, re-run)
    assert extra == pytest.approx((all_to_all + dp_bytes) / (links.nvlink * 1e9), rel=1e-3)
    across = step_time(cp4, e4, 989, 0.5, 2, links)  # 2 GPUs per node: the CP group spans 2 nodes
    assert across > step_time(cp4, e4, 989, 0.5, 8, links) + 0.5 * all_to_all / (links.ib * 1e9)


def test_the_ranking_offers_cp_for_1b_at_32k_and_puts_it_first_at_131072():
    ranked = rank_layouts(preset(), 1, 8, VOCAB_1B, "H100", 989, 0.6)
    assert {r.cp for r in ranked} == {1, 2, 4, 8} and all(r.pp == 1 for r in ranked if r.cp > 1)
    assert any((r.tp, r.cp, r.zero, r.recompute, r.micro) == (1, 4, 2, "selective", 1) for r in ranked)
    long = rank_layouts(preset("train.seq_len=131072"), 1, 8, VOCAB_1B, "H100", 989, 0.6)
    # without cp a rank fits 131072 tokens only by recomputing everything or by splitting heads 4+ ways over TP
    assert all(r.recompute == "full" or r.tp >= 4 for r in long if r.cp == 1)
    assert long[0].cp > 1  # and the all-to-all costs less than TP's all-reduces or full recompute


def test_the_preset_header_is_what_plan_prints(capsys):
    """Every line the header quotes under its `pretrain plan` command is a line that command prints now."""
    header = [line[1:] for line in PRESET.read_text().splitlines() if line.startswith("#")]
    start = next(i for i, line in enumerate(header) if line.strip().startswith("pretrain plan "))
    quoted = []
    for line in header[start + 1:]:
        if not line.startswith("   "):
            break
        quoted.append(line[3:])
    assert len(quoted) >= 5 and any(q.startswith("per-rank memory estimate:") for q in quoted)
    assert main(shlex.split(header[start].strip())[1:]) == 0
    printed = capsys.readouterr().out.splitlines()
    for line in quoted:
        assert line in printed, f"configs/1b-32k.yaml's header is stale: {line!r} is not printed"


def test_the_preset_headers_other_figures():
    """What the header says after the quoted lines: cp=1 at 32768, then cp=4 and cp=1 at 131072 tokens."""
    header = [line for line in PRESET.read_text().splitlines() if line.startswith("#")]
    last_quoted = max(i for i, line in enumerate(header) if line.startswith("#   "))
    stated = [float(x) for x in re.findall(r"~(\d+\.\d+) GiB", " ".join(header[last_quoted + 1:]))]
    cases = [("parallel.cp=1", "train.grad_accum=4"), ("train.seq_len=131072",),
             ("train.seq_len=131072", "parallel.cp=1", "train.grad_accum=4")]
    assert stated == [round(estimate(preset(*c), 8).total / GiB, 2) for c in cases]
    assert fits_h100(preset(*cases[0])) and fits_h100(preset(*cases[1])) and not fits_h100(preset(*cases[2]))


def fits_h100(cfg) -> bool:
    from pretrain.plan.describe import fits
    return fits(estimate(cfg, 8), "H100")


def test_the_memory_refusal_names_parallel_cp():
    cfg = load_config(None, ["model.flavor=debug", "model.vocab_size=256", "train.device=cpu",
                             "train.seq_len=100000000", "train.micro_batch_size=1"])
    with pytest.raises(ConfigError, match=r"or a long sequence over parallel.cp .*now cp=1"):
        check_memory(cfg, planned_run(cfg, 1, 256))


def test_dry_run_layout_line_shows_cp(tmp_path, capsys):
    shards = tiny_shards(tmp_path / "data") / "shards"
    assert main(["train", "--config", "configs/debug.yaml", "--dry-run", "--world-size", "4",
                 "--set", f"data.path={shards}", "--set", "parallel.cp=2", "--set", "tracking.enabled=false",
                 "--set", f"checkpoint.dir={tmp_path / 'run'}"]) == 0
    out = capsys.readouterr().out
    assert "layout: world=4 = tp 1 x cp 2 x pp 1 x dp 2; ZeRO-2 over dp x cp = 4;" in out
    assert "context parallel: 64 of 128 tokens per rank" in out
    assert "batch: micro 4 x accum 1 x dp 2 = 8 sequences" in out
