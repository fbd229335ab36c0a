"""Every invalid layout is refused before any process group or model exists, with a one-line message naming the
key to change. One case per rule, as data."""
from __future__ import annotations

import pytest

from pretrain.config import ConfigError, load_config
from pretrain.run.layout import kv_replicas, pad_vocab, resolve_layout

# (rule, overrides, world size, vocab, a fragment the message must contain)
RULES = [
    ("world not a multiple of tp x pp", ["parallel.tp=2", "parallel.pp=2"], 6, 256, "not divisible by tp x pp"),
    ("dim not divisible by heads", ["model.dim=66"], 1, 256, "model.dim=66"),
    ("heads not a multiple of kv heads", ["model.n_heads=4", "model.n_kv_heads=3"], 1, 256, "model.n_kv_heads"),
    ("query heads not divisible by tp", ["parallel.tp=8"], 8, 256, "model.n_heads=4 is not divisible by parallel.tp"),
    ("kv heads not divisible by tp", ["parallel.tp=4"], 4, 256, "model.n_kv_heads=2 is not divisible"),
    ("ffn width not divisible by tp", ["model.ffn_hidden_dim=190", "parallel.tp=4", "model.n_kv_heads=4"], 4, 256,
     "FFN hidden dim 190"),
    ("layers not divisible by pp", ["model.n_layers=3", "parallel.pp=2"], 2, 256, "model.n_layers=3"),
    ("vocab unknown", [], 1, None, "model.vocab_size is unknown"),
    ("tied embeddings across stages", ["model.tie_embeddings=true", "parallel.pp=2"], 2, 256,
     "model.tie_embeddings"),
    ("world not a multiple of tp x cp x pp", ["parallel.tp=2", "parallel.cp=2"], 6, 256,
     "not divisible by tp x cp x pp = 2 x 2 x 1"),
    ("query heads not divisible by tp x cp", ["parallel.tp=2", "parallel.cp=4"], 8, 256,
     "model.n_heads=4 is not divisible by parallel.tp x parallel.cp = 2 x 4"),
]


@pytest.mark.parametrize("rule,overrides,world,vocab,fragment", RULES, ids=[r[0] for r in RULES])
def test_layout_rule(rule, overrides, world, vocab, fragment):
    cfg = load_config(None, overrides)
    with pytest.raises(ConfigError) as err:
        resolve_layout(cfg, world, vocab)
    assert fragment in str(err.value)
    assert "\n" not in str(err.value)


# Rules the typed config enforces on load (DeepSpeed's pipeline + ZeRO rule, SP needs TP).
LOAD_RULES = [
    ("pipeline with ZeRO-2", ["parallel.pp=2", "parallel.zero_stage=2"], "incompatible with pipeline parallelism"),
    ("pipeline with ZeRO-3", ["parallel.pp=2", "parallel.zero_stage=3"], "incompatible with pipeline parallelism"),
    ("sequence parallel without TP", ["parallel.sequence_parallel=true"], "sequence_parallel needs tp > 1"),
    ("zero stage out of range", ["parallel.zero_stage=4"], "parallel.zero_stage"),
    ("pipeline with context parallelism", ["parallel.pp=2", "parallel.cp=2"], "parallel.cp=2 with parallel.pp=2"),
    ("sequence not divisible by cp", ["train.seq_len=100", "parallel.cp=3"],
     "train.seq_len=100 is not divisible by parallel.cp=3"),
    ("in-loop evaluation with cp", ["parallel.cp=2", "eval.tasks=[hellaswag]", "eval.every=10"],
     "eval.tasks with parallel.cp=2"),
]


@pytest.mark.parametrize("rule,overrides,fragment", LOAD_RULES, ids=[r[0] for r in LOAD_RULES])
def test_config_rule(rule, overrides, fragment):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert fragment in str(err.value) and "\n" not in str(err.value)


# Rules that need the machine (init_distributed checks them before creating any process group).
DEVICE_RULES = [
    ("sequence parallel on CPU", ["parallel.tp=2", "parallel.sequence_parallel=true", "train.device=cpu"], 2,
     "parallel.sequence_parallel needs CUDA"),
    ("nccl without CUDA", ["train.backend=nccl", "train.device=cpu"], 1, "train.backend=nccl needs"),
    ("bf16 without ZeRO", ["train.dtype=bf16", "parallel.zero_stage=0"], 1, "train.dtype=bf16 needs"),
]


@pytest.mark.parametrize("rule,overrides,world,fragment", DEVICE_RULES, ids=[r[0] for r in DEVICE_RULES])
def test_device_rule(monkeypatch, rule, overrides, world, fragment):
    from pretrain.run.distributed import init_distributed

    import torch.distributed as dist

    monkeypatch.setenv("WORLD_SIZE", str(world))
    monkeypatch.setenv("RANK", "0")
    had_group = dist.is_initialized()
    with pytest.raises(ConfigError) as err:
        cfg = load_config(None, overrides)
        init_distributed(cfg, layout=resolve_layout(cfg, world, 256))
    assert fragment in str(err.value) and "\n" not in str(err.value)
    assert dist.is_initialized() == had_group  # refused before any process group was made


def test_vocab_is_padded_per_tp_shard():
    assert pad_vocab(256, 1) == 256 and pad_vocab(257, 1) == 384 and pad_vocab(257, 2) == 512
    lay = resolve_layout(load_config(None, ["parallel.tp=2", "train.grad_accum=3"]), 8, 1000)
    assert (lay.dp, lay.padded_vocab_size, lay.global_batch) == (4, 1024, 2 * 3 * 4)


def test_bf16_needs_zero_for_fp32_master_weights():
    with pytest.raises(ConfigError, match="train.dtype=bf16 needs parallel.zero_stage >= 1"):
        load_config(None, ["train.dtype=bf16", "parallel.zero_stage=0"])


def test_sequence_parallel_needs_seq_len_divisible_by_tp():
    with pytest.raises(ConfigError, match="train.seq_len=15 is not divisible by parallel.tp=2"):
        load_config(None, ["parallel.tp=2", "parallel.sequence_parallel=true", "train.seq_len=15"])
    # with cp, each rank's seq_len / cp tokens split over TP
    with pytest.raises(ConfigError, match="train.seq_len=20 is not divisible by parallel.tp=2 x parallel.cp=4"):
        load_config(None, ["parallel.tp=2", "parallel.cp=4", "parallel.sequence_parallel=true", "train.seq_len=20"])


@pytest.mark.parametrize("heads,kv,cp,copies", [(4, 2, 2, 1), (2, 1, 2, 2), (8, 2, 4, 2), (8, 2, 8, 4), (8, 8, 4, 1),
                                                (12, 4, 6, 3)])
def test_kv_heads_are_repeated_as_few_times_as_lets_cp_ranks_hold_whole_groups(heads, kv, cp, copies):
    """Ulysses gives each of cp ranks heads/cp query heads; the key/value heads they read must arrive with them."""
    assert kv_replicas(heads, kv, cp) == copies
    assert (kv * copies) % cp == 0 and (heads // kv) % copies == 0
