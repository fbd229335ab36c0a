"""Back-of-envelope per-rank memory for a config and world size, without building anything (`--dry-run`).

An estimate, not a promise: weights, grads and AdamW state as ZeRO shards them, plus activations by
Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer Models"): per block and
micro-batch, s*b*h*(34 + 5*a*s/h) bytes in 16-bit without recomputation, divided by TP (the 5as/h term is the
attention scores, which flash SDPA never stores, so it is dropped for bf16); 2*s*b*h bytes (the block input) with
full recomputation. Pipeline stages hold `pp` micro-batches in flight (1F1B), so activations are for
layers/pp blocks times min(pp, grad_accum) micro-batches. Framework buffers, fragmentation and the CUDA context
are not counted: leave 10-20% headroom.
"""
from __future__ import annotations

from dataclasses import dataclass

from pretrain.config import Config, Layout


@dataclass(frozen=True)
class MemoryPlan:
    params_total: int
    params_non_embedding: int
    params_per_rank: int
    weights_gib: float
    grads_gib: float
    optimizer_gib: float
    activations_gib: float

    @property
    def total_gib(self) -> float:
        return self.weights_gib + self.grads_gib + self.optimizer_gib + self.activations_gib


def estimate(cfg: Config, layout: Layout) -> MemoryPlan:
    args = cfg.model.args(layout.padded_vocab_size)
    total = args.num_params(layout.padded_vocab_size)
    per_rank = total // (layout.tp * layout.pp)
    low = 2 if cfg.train.dtype == "bf16" else 4
    zero, dp = cfg.parallel.zero_stage, layout.dp
    weights = per_rank * low / (dp if zero >= 3 else 1)
    grads = per_rank * low / (dp if zero >= 2 else 1)
    # AdamW m and v in fp32, plus an fp32 master copy when training in bf16.
    opt = per_rank * (8 + (4 if cfg.train.dtype == "bf16" else 0)) / (dp if zero >= 1 else 1)
    s, b, h, a = cfg.train.seq_len, cfg.train.micro_batch_size, args.dim, args.n_heads
    if cfg.model.activation_checkpointing == "full":
        per_block = 2 * s * b * h
    elif cfg.model.activation_checkpointing == "selective":
        per_block = s * b * h * 24 / layout.tp  # attention's internals recomputed (rough)
    elif cfg.train.dtype == "bf16":
        per_block = s * b * h * 34 / layout.tp  # flash SDPA stores no (s x s) scores
    else:
        per_block = s * b * h * (34 + 5 * a * s / h) / layout.tp  # fp32 math path keeps the scores
    in_flight = min(layout.pp, layout.grad_accum) if layout.pp > 1 else 1
    acts = per_block * (args.n_layers // layout.pp) * in_flight * (low / 2)
    gib = 2**30
    return MemoryPlan(total, args.num_params(layout.padded_vocab_size, embeddings=False), per_rank,
                      weights / gib, grads / gib, opt / gib, acts / gib)


def describe(cfg: Config, layout: Layout) -> str:
    m = estimate(cfg, layout)
    return "\n".join([
        f"layout: world={layout.world} = tp {layout.tp} x pp {layout.pp} x dp {layout.dp}; zero stage "
        f"{cfg.parallel.zero_stage}; global batch {layout.global_batch} sequences = micro {layout.micro_batch_size}"
        f" x accum {layout.grad_accum} x dp {layout.dp}; {layout.global_batch * cfg.train.seq_len:,} tokens/step",
        f"model: {cfg.model.flavor}, {m.params_total:,} parameters ({m.params_non_embedding:,} non-embedding), "
        f"vocab padded to {layout.padded_vocab_size}",
        f"per-rank memory estimate ({cfg.train.dtype}): weights {m.weights_gib:.2f} GiB + grads {m.grads_gib:.2f}"
        f" + optimizer {m.optimizer_gib:.2f} + activations {m.activations_gib:.2f} = {m.total_gib:.2f} GiB "
        f"(+10-20% for buffers)",
    ])
