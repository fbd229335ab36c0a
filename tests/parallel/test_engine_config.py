"""The DeepSpeed config is generated from the typed config, and the dry-run description needs no model."""
from __future__ import annotations

import pytest

from pretrain.config import ConfigError, load_config
from pretrain.plan.describe import describe


def test_deepspeed_config_follows_typed_config():
    from pretrain.train.engine import deepspeed_config

    cfg = load_config(None, ["train.micro_batch_size=3", "train.grad_accum=5", "parallel.zero_stage=3",
                             "train.dtype=bf16", "optim.grad_clip=0.5"])
    ds = deepspeed_config(cfg, dp=4)
    assert ds["train_batch_size"] == 3 * 5 * 4
    assert ds["train_micro_batch_size_per_gpu"] == 3 and ds["gradient_accumulation_steps"] == 5
    assert ds["zero_optimization"]["stage"] == 3 and ds["bf16"]["enabled"]
    assert ds["data_types"]["grad_accum_dtype"] == "fp32"  # fp32 master weights and accumulation
    assert ds["gradient_clipping"] == 0.5 and not ds["wall_clock_breakdown"]
    # ZeRO-0 in fp32: DeepSpeed would neither report the norm nor skip a non-finite step, so we clip ourselves.
    assert deepspeed_config(load_config(None, ["parallel.zero_stage=0"]), dp=1)["gradient_clipping"] == 0.0


def test_describe_reports_layout_params_and_memory():
    cfg = load_config(None, ["model.flavor=7b", "parallel.tp=8", "parallel.zero_stage=1", "train.dtype=bf16",
                             "train.seq_len=4096", "train.micro_batch_size=1"])
    text = describe(cfg, 64, 32000)
    assert "tp 8 x pp 1 x dp 8" in text and "ZeRO-1" in text
    assert "params=6,744,707,072" in text  # LLaMA-2 7B with the vocab padded to 32768 (128 x tp)
    zero3 = describe(cfg.model_copy(update={"parallel": cfg.parallel.model_copy(update={"zero_stage": 3})}),
                     64, 32000)

    def weights_gib(t: str) -> float:
        value, unit = t.split("weights ")[1].split(",")[0].split()
        return float(value) / (1024 if unit == "MiB" else 1)

    assert weights_gib(zero3) < weights_gib(text) / 4  # ZeRO-3 partitions weights over the 8 DP ranks
    with pytest.raises(ConfigError, match="not divisible by tp x pp"):
        describe(cfg, 60, 32000)
