"""The one layout of a run: how its ranks split into tensor, pipeline and data parallel groups, derived once from
the config and the world size (every divisibility and batch rule checked before any process group exists), and the
rank arithmetic everything else asks it for. Torch-free."""
from __future__ import annotations

import math
from dataclasses import dataclass

from pretrain.config import Config, ConfigError


@dataclass(frozen=True)
class Layout:
    """How `world` ranks split into data x pipeline x tensor parallel groups (megatron-core order tp-dp-pp)."""
    world: int
    tp: int
    pp: int
    dp: int
    micro_batch_size: int
    grad_accum: int
    padded_vocab_size: int

    @property
    def global_batch(self) -> int:
        return self.micro_batch_size * self.grad_accum * self.dp

    def stream_rank(self, dp_rank: int) -> int:
        """A rank of this layout whose loader stream (and RNG) DP rank `dp_rank` of any layout continues: one with
        the same DP index (TP and PP peers of a DP rank read the same stream)."""
        return stream_rank(self.tp, self.dp, dp_rank)


def stream_rank(tp: int, dp: int, dp_rank: int) -> int:
    """megatron-core's rank order is tp fastest, then dp, then pp: DP index d's first rank is d * tp (a DP index
    past this layout's wraps round: a resume on more DP ranks continues the saved streams in turn)."""
    return (dp_rank % dp) * tp


def pad_vocab(vocab_size: int, tp: int, multiple: int = 128) -> int:
    """Vocab rounded up so each TP shard is a multiple of 128 rows (Megatron's rule: aligned GEMMs)."""
    step = multiple * tp
    return int(math.ceil(vocab_size / step) * step)


def check_layout(cfg: Config, world_size: int) -> None:
    """The layout rules that need no vocabulary, so they fail before any shard manifest is read."""
    p = cfg.parallel
    args = cfg.model.args()
    if world_size % (p.tp * p.pp) != 0:
        raise ConfigError(f"world size {world_size} is not divisible by tp x pp = {p.tp} x {p.pp}; "
                          f"launch a multiple of {p.tp * p.pp} ranks")
    if args.dim % args.n_heads != 0:
        raise ConfigError(f"model.dim={args.dim} is not divisible by model.n_heads={args.n_heads}")
    if args.head_dim % 2:
        raise ConfigError(f"model.dim={args.dim} / model.n_heads={args.n_heads} = {args.head_dim}: RoPE rotates "
                          "pairs of a head's channels, so the head dim must be even")
    if args.n_heads % args.kv_heads != 0:
        raise ConfigError(f"model.n_heads={args.n_heads} is not a multiple of model.n_kv_heads={args.kv_heads}")
    if args.n_heads % p.tp != 0:
        raise ConfigError(f"model.n_heads={args.n_heads} is not divisible by parallel.tp={p.tp}")
    if args.kv_heads % p.tp != 0:
        raise ConfigError(f"model.n_kv_heads={args.kv_heads} is not divisible by parallel.tp={p.tp}; "
                          "each TP rank needs whole key/value heads")
    if args.hidden_dim % p.tp != 0:
        raise ConfigError(f"FFN hidden dim {args.hidden_dim} is not divisible by parallel.tp={p.tp}")
    if args.n_layers % p.pp != 0:
        raise ConfigError(f"model.n_layers={args.n_layers} is not divisible by parallel.pp={p.pp}")
    if args.tie_embeddings and p.pp > 1:
        raise ConfigError("model.tie_embeddings with parallel.pp > 1 is not supported; untie or use pp=1")


def resolve_layout(cfg: Config, world_size: int, vocab_size: int | None = None) -> Layout:
    """Every divisibility and batch rule that can be checked before a process group exists, and the padded vocab.
    The one place the layout is derived: `pretrain.run.resolved.resolve_run` calls it for the whole run."""
    check_layout(cfg, world_size)
    p = cfg.parallel
    args = cfg.model.args(vocab_size)
    if args.vocab_size is None:
        raise ConfigError("model.vocab_size is unknown: set model.vocab_size or point data.path at shards "
                          "whose manifest.json names the tokenizer")
    return Layout(world=world_size, tp=p.tp, pp=p.pp, dp=world_size // (p.tp * p.pp),
                  micro_batch_size=cfg.train.micro_batch_size, grad_accum=cfg.train.grad_accum,
                  padded_vocab_size=pad_vocab(args.vocab_size, p.tp))
