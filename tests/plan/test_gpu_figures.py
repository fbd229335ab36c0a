"""The planner against the peaks measured on one H200 (benchmarks/results/mfu_h200_*.json, 2026-12-04, with the
output head of that time, which kept the whole logits: `Kernels(whole_logits=True)`, and the selective recompute
of that time), and what the chunked head changes for the presets as shipped."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from pretrain.cli import _assumed_vocab
from pretrain.config import load_config
from pretrain.plan.describe import GiB, Kernels, estimate, head_activations

RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"
CONFIGS = Path(__file__).resolve().parents[2] / "configs"
FIGURES = sorted(RESULTS.glob("mfu_h200_*.json"))


def _measured_config(record: dict):
    """The run's config as benchmarks/mfu.py recorded it, back through the typed config."""
    overrides = [f"{section}.{key}={value}" for section, values in record["config"].items()
                 for key, value in values.items() if value is not None and not isinstance(value, (list, dict))]
    return load_config(None, overrides)


def _earlier_selective_saving(cfg) -> float:
    """Bytes per micro-batch that `selective` saved over `none` when these figures were taken: it recomputed each
    block's whole attention sub-block (its norm, the linears' shared input, q/k/v, attention's output and
    log-sum-exp) and kept the block input. Today's selective is op-level (pretrain/model/recompute.py)."""
    args, S, a = cfg.model.args(), cfg.train.micro_batch_size * cfg.train.seq_len, 2
    D, hd, H, K = args.dim, args.head_dim, args.n_heads, args.kv_heads
    norm = S * D * (a if cfg.model.fused_kernels else 4 + a) + 4 * S
    attention_sub_block = norm + S * D * a + S * hd * a * (2 * H + 2 * K) + 4 * S * H
    return args.n_layers * (attention_sub_block - S * D * a)


@pytest.mark.parametrize("path", FIGURES, ids=[p.stem for p in FIGURES])
def test_planned_peak_is_within_10_percent_of_the_h200_measurement(path):
    record = json.loads(path.read_text())
    cfg = _measured_config(record)
    kernels = Kernels(fused=cfg.model.fused_kernels, whole_logits=True)
    saving = 0.0
    if cfg.model.activation_checkpointing == "selective":  # the policy of that time, from `none`
        saving = _earlier_selective_saving(cfg)
        cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"activation_checkpointing": "none"})})
    planned = (estimate(cfg, record["nproc"], kernels=kernels).total - saving) / GiB
    measured = record["peak_mem_gib"]
    assert planned == pytest.approx(measured, rel=0.10), f"planned {planned:.2f} GiB, measured {measured:.2f} GiB"


def test_the_figures_are_all_there():
    assert {p.stem for p in FIGURES} >= {"mfu_h200_125m", "mfu_h200_1b_m2_none", "mfu_h200_1b_m2_selective",
                                         "mfu_h200_1b_m8_eager_selective"}


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "eager"])
def test_the_chunked_head_takes_the_logits_out_of_the_1b_presets_peak(fused):
    """1b as shipped (micro 8 x 4096 tokens, vocab 128256) on one GPU: the whole-logits head held 8-31 GiB; the
    chunked one holds its weight's gradient and one chunk, under 5 GiB, whatever the kernels."""
    cfg = load_config(CONFIGS / "1b.yaml", [f"model.fused_kernels={str(fused).lower()}"])
    cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"vocab_size": _assumed_vocab("1b")[0]})})
    args, S = cfg.model.args(), cfg.train.micro_batch_size * cfg.train.seq_len
    chunked = sum(head_activations(args, S, 1, False, 2, Kernels(fused=fused)))
    whole = sum(head_activations(args, S, 1, False, 2, Kernels(fused=fused, whole_logits=True)))
    assert chunked < 5 * GiB and whole > 7 * GiB, (chunked / GiB, whole / GiB)
