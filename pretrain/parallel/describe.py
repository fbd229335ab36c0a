"""`--dry-run`: the resolved layout, parameter count and a per-rank memory estimate, without building anything.

Estimate (bytes per parameter held by a rank, mixed precision as DeepSpeed does it): weights 4 (fp32) or 2
(bf16); gradients the same (bf16 runs accumulate in fp32: +4 under ZeRO <= 1 counted with the optimizer);
optimizer: fp32 master copy (bf16 only) + Adam's two moments = 12 or 8 bytes. ZeRO-1 partitions the optimizer
over DP, ZeRO-2 also the gradients, ZeRO-3 also the weights. Activations: a rough per-layer count for a
micro-batch (~34 * B * T * D bytes-equivalents in 16-bit, Korthikanti et al. 2022, without recompute), divided by
TP, with full recompute keeping only each block's input. Good to ~20%; it ignores fragmentation and buffers.
"""
from __future__ import annotations

from dataclasses import dataclass

from pretrain.config import Config, Layout
from pretrain.model.args import ModelArgs
from pretrain.resolved import ResolvedRun

GiB = 1024**3


def _size(n_bytes: float) -> str:
    for unit, scale in (("GiB", GiB), ("MiB", 1024**2)):
        if n_bytes >= scale or unit == "MiB":
            return f"{n_bytes / scale:.2f} {unit}"
    raise AssertionError


@dataclass(frozen=True)
class Estimate:
    """Per-rank memory (bytes) of the most loaded rank, and the numbers a throughput prediction needs."""
    layout: Layout
    args: ModelArgs
    params: int
    weights: float
    grads: float
    optimizer: float
    activations: float

    @property
    def total(self) -> float:
        return self.weights + self.grads + self.optimizer + self.activations


def estimate(cfg: Config, run: ResolvedRun) -> Estimate:
    """The resolved run's layout and model (padded vocabulary); `cfg` for what the run does not fix
    (activation checkpointing)."""
    lay, args = run.layout, run.model
    total = args.num_params()
    # Per-rank share: blocks split over PP and TP; embeddings/head split over TP and sit on first/last stage.
    embed = args.vocab_size * args.dim * (1 if args.tie_embeddings else 2)
    blocks = total - embed
    # With pp > 1 the first stage holds the embedding and the last the head: the worst stage holds one of them.
    embed_here = embed if lay.pp == 1 else args.vocab_size * args.dim
    per_rank = (blocks / lay.pp + embed_here) / lay.tp
    bf16 = cfg.train.dtype == "bf16"
    z, dp = cfg.parallel.zero_stage, lay.dp
    w_bytes = 2 if bf16 else 4
    weights = per_rank * w_bytes / (dp if z >= 3 else 1)
    grads = per_rank * 4 / (dp if z >= 2 else 1)  # fp32 either way (bf16 accumulates gradients in fp32)
    optim = per_rank * ((4 if bf16 else 0) + 8) / (dp if z >= 1 else 1)
    B, T, D = cfg.train.micro_batch_size, cfg.train.seq_len, args.dim
    layers_here = args.n_layers / lay.pp
    if cfg.model.activation_checkpointing == "full":
        act = layers_here * B * T * D * w_bytes + 34 * B * T * D / lay.tp * (w_bytes / 2)
    else:
        act = layers_here * 34 * B * T * D / lay.tp * (w_bytes / 2)
    act += B * T * args.vocab_size / lay.tp * 4 * 2  # fp32 logits + their grad on the last stage
    return Estimate(lay, args, total, weights, grads, optim, act)


def describe(cfg: Config, run: ResolvedRun) -> str:
    e = estimate(cfg, run)
    lay, args, T = e.layout, e.args, cfg.train.seq_len
    lines = [
        f"layout: world={lay.world} = tp {lay.tp} x pp {lay.pp} x dp {lay.dp}; ZeRO-{cfg.parallel.zero_stage}; "
        f"{cfg.train.dtype}{'; sequence parallel' if cfg.parallel.sequence_parallel else ''}",
        f"batch: micro {lay.micro_batch_size} x accum {lay.grad_accum} x dp {lay.dp} = {lay.global_batch} "
        f"sequences = {lay.global_batch * T:,} tokens per step",
        f"model: {cfg.model.flavor} dim={args.dim} layers={args.n_layers} heads={args.n_heads}/{args.kv_heads} "
        f"ffn={args.hidden_dim} vocab={lay.padded_vocab_size} (padded) params={e.params:,} ({e.params / 1e9:.3f} B)",
        f"per-rank memory estimate: weights {_size(e.weights)}, grads {_size(e.grads)}, optimizer "
        f"{_size(e.optimizer)}, activations ~{_size(e.activations)} (checkpointing "
        f"{cfg.model.activation_checkpointing}); total ~{_size(e.total)}",
    ]
    return "\n".join(lines)


def throughput(cfg: Config, e: Estimate, peak_tflops: float, mfu: float) -> str:
    """What the cluster would do at a given MFU: tokens/s, step time, and days to the run's token budget.

    MFU is an input, not an output: it is what benchmarks/mfu.py measures on one node of the target hardware.
    """
    from pretrain.metrics import flops_per_token

    T = cfg.train.seq_len
    tokens_per_s = mfu * peak_tflops * 1e12 * e.layout.world / flops_per_token(e.args, T, e.args.vocab_size)
    step_tokens = e.layout.global_batch * T
    run_tokens = step_tokens * cfg.train.max_steps
    return (f"throughput at {mfu:.0%} MFU of {peak_tflops:g} TFLOP/s per GPU: {tokens_per_s:,.0f} tokens/s "
            f"({tokens_per_s / e.layout.world:,.0f} per GPU), {step_tokens / tokens_per_s:.2f} s per step; "
            f"train.max_steps={cfg.train.max_steps:,} = {run_tokens / 1e9:,.1f} B tokens in "
            f"{run_tokens / tokens_per_s / 86400:.1f} days")
