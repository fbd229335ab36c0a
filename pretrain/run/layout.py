"""The one layout of a run: how its ranks split into tensor, context, pipeline and data parallel groups, derived
once from the config and the world size (every divisibility and batch rule checked before any process group
exists), and the rank arithmetic everything else asks it for. Torch-free."""
from __future__ import annotations

import math
from dataclasses import dataclass

from pretrain.config import Config, ConfigError


@dataclass(frozen=True)
class Layout:
    """How `world` ranks split into data x pipeline x context x tensor parallel groups (megatron-core's order
    tp-cp-dp-pp, TP fastest). Context parallelism (cp) splits each sequence, not the batch: the cp ranks of a DP
    index read the same micro-batches, hold the same weights and average gradients with the DP ranks."""
    world: int
    tp: int
    pp: int
    dp: int
    micro_batch_size: int
    grad_accum: int
    padded_vocab_size: int
    cp: int = 1  # last, with a default: resolved runs written before context parallelism read as cp 1

    @property
    def global_batch(self) -> int:
        return self.micro_batch_size * self.grad_accum * self.dp

    @property
    def shape_text(self) -> str:
        """How the ranks split, in the words every message uses: `tp 1 x cp 2 x pp 1 x dp 2` (cp only when > 1)."""
        cp = f" x cp {self.cp}" if self.cp > 1 else ""
        return f"tp {self.tp}{cp} x pp {self.pp} x dp {self.dp}"

    @property
    def weight_replicas(self) -> int:
        """Ranks holding the same weight slice, averaging gradients and sharing ZeRO partitions: dp x cp
        (DeepSpeed's sequence-data-parallel group)."""
        return self.dp * self.cp

    def stream_rank(self, dp_rank: int) -> int:
        """A rank of this layout whose loader stream (and RNG) DP rank `dp_rank` of any layout continues: one with
        the same DP index (TP, CP and PP peers of a DP rank read the same stream)."""
        return stream_rank(self.tp * self.cp, self.dp, dp_rank)


def stream_rank(tp_cp: int, dp: int, dp_rank: int) -> int:
    """megatron-core's rank order is tp fastest, then cp, then dp, then pp: DP index d's first rank is
    d * tp * cp (a DP index past this layout's wraps round: a resume on more DP ranks continues the saved streams
    in turn)."""
    return (dp_rank % dp) * tp_cp


def pad_vocab(vocab_size: int, tp: int, multiple: int = 128) -> int:
    """Vocab rounded up so each TP shard is a multiple of 128 rows (Megatron's rule: aligned GEMMs)."""
    step = multiple * tp
    return int(math.ceil(vocab_size / step) * step)


def check_layout(cfg: Config, world_size: int) -> None:
    """The layout rules that need no vocabulary, so they fail before any shard manifest is read."""
    p = cfg.parallel
    args = cfg.model.args()
    if world_size % (p.tp * p.pp * p.cp) != 0:
        shape = f"tp x pp = {p.tp} x {p.pp}" if p.cp == 1 else f"tp x cp x pp = {p.tp} x {p.cp} x {p.pp}"
        raise ConfigError(f"world size {world_size} is not divisible by {shape}; "
                          f"launch a multiple of {p.tp * p.pp * p.cp} ranks")
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
    if p.cp > 1:
        check_context_parallel(args.n_heads, args.kv_heads, p.tp, p.cp)
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
    return Layout(world=world_size, tp=p.tp, pp=p.pp, dp=world_size // (p.tp * p.pp * p.cp), cp=p.cp,
                  micro_batch_size=cfg.train.micro_batch_size, grad_accum=cfg.train.grad_accum,
                  padded_vocab_size=pad_vocab(args.vocab_size, p.tp))


def check_context_parallel(n_heads: int, kv_heads: int, tp: int, cp: int) -> None:
    """Ulysses' all-to-all gives each of the cp ranks whole heads: H / tp query heads must split cp ways. Key/value
    heads that do not (grouped-query attention with K / tp < cp, or not a multiple of cp) are replicated first, as
    few times as lets each rank hold the key/value heads its query heads read (`kv_replicas`)."""
    if n_heads % (tp * cp) != 0:
        raise ConfigError(f"model.n_heads={n_heads} is not divisible by parallel.tp x parallel.cp = {tp} x {cp}: "
                          "context parallelism gives each rank whole attention heads of the full sequence")


def kv_replicas(n_heads: int, kv_heads: int, cp: int) -> int:
    """How many copies of each of this TP rank's K key/value heads the all-to-all needs so that cp ranks get
    whole groups: the smallest r dividing the group size H/K with K*r a multiple of cp (r = H/K always works,
    since H is a multiple of cp)."""
    group = n_heads // kv_heads
    return next(r for r in range(1, group + 1) if group % r == 0 and (kv_heads * r) % cp == 0)
