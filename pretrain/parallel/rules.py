"""Engine rules that resolve_layout (pretrain/config.py) does not know, checked before anything is built.

Called by `init_distributed` (before any process group) and by `describe` (the dry run).
"""
from __future__ import annotations

from pretrain.config import Config, ConfigError


def check_engine_rules(cfg: Config) -> None:
    if cfg.train.dtype == "bf16" and cfg.parallel.zero_stage == 0:
        # DeepSpeed 0.19 without ZeRO either refuses bf16 weights with fp32 gradient accumulation ("unsupported mix")
        # or, with bf16 accumulation, steps the bf16 weights directly: no fp32 master copy.
        raise ConfigError("train.dtype=bf16 needs parallel.zero_stage >= 1: DeepSpeed keeps fp32 master weights "
                          "only in its ZeRO optimizers (ZeRO-1 costs no extra memory); set parallel.zero_stage=1")
    p, seq = cfg.parallel, cfg.train.seq_len
    if p.sequence_parallel and seq % p.tp != 0:
        raise ConfigError(f"train.seq_len={seq} is not divisible by parallel.tp={p.tp}: sequence parallelism splits "
                          "the sequence evenly over TP ranks")
