"""The one seeded initialisation entry point, independent of the parallel layout.

Every parameter is drawn whole, from a generator seeded by (seed, its reference name), and then the slice this
rank holds is copied in. So the value of `layers.3.attention.wq.weight[17, 5]` depends only on the seed: not on
TP degree (which slice a rank holds), not on PP degree (which blocks a stage builds, or in what order), not on
the order modules were constructed. This costs drawing one whole tensor at a time on CPU, which is the price
megatron-core's `use_cpu_initialization` also pays, and it makes the parity tests' "same init" a fact.

Scheme (GPT-2 / Megatron): normal(0, init_std) for embeddings and projections; the projections that write into
the residual stream (wo, w2) are scaled by 1/sqrt(2 * n_layers) so the stream's variance does not grow with
depth; RMSNorm weights (the QK-norm's too) are ones.

Starting from existing weights (`model.init_from`) goes through the same path: the whole tensor then comes from
the checkpoint instead of the generator, and each rank copies its slice of it. Vocabulary rows the checkpoint does
not have (the padding the new layout adds) keep their seeded values; they are never inputs and never targets.
"""
from __future__ import annotations

import math
import zlib
from typing import Callable, Iterable

import torch

from pretrain.model.args import ModelArgs


def _generator(seed: int, name: str) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63 - 1))


def full_init(name: str, shape: tuple[int, ...], args: ModelArgs, seed: int) -> torch.Tensor:
    """The whole fp32 tensor that the reference parameter `name` starts from."""
    if name.endswith("norm.weight"):
        return torch.ones(shape)
    std = args.init_std
    if name.endswith(("attention.wo.weight", "feed_forward.w2.weight")):
        std = std / math.sqrt(2 * args.n_layers)
    return torch.empty(shape).normal_(0.0, std, generator=_generator(seed, name))


def local_slice(full: torch.Tensor, param: torch.Tensor, tp_rank: int) -> torch.Tensor:
    """This rank's piece of `full`: megatron-core marks a TP-split parameter with `partition_dim`; contiguous
    chunks in rank order (ColumnParallel: output rows, RowParallel: input columns, VocabParallel: vocab rows)."""
    shape = tuple(getattr(param, "ds_shape", param.shape))  # ZeRO-3 keeps the real shape in ds_shape
    if tuple(full.shape) == shape:
        return full
    dim = getattr(param, "partition_dim", None)
    if dim is None or getattr(param, "partition_stride", 1) != 1:
        raise ValueError(f"cannot map a {tuple(full.shape)} tensor onto a {shape} parameter")
    size = shape[dim]
    return full.narrow(dim, tp_rank * size, size)


FullTensor = Callable[[str, tuple[int, ...]], torch.Tensor]  # (reference name, full shape) -> whole tensor
VOCAB_ROWS = ("tok_embeddings.weight", "output.weight")  # rows padded to 128 x tp: differ between layouts


def seeded(args: ModelArgs, seed: int) -> FullTensor:
    return lambda name, shape: full_init(name, shape, args, seed)


def from_weights(read: Callable[[str], torch.Tensor], args: ModelArgs, seed: int) -> FullTensor:
    """Whole tensors read by reference name (e.g. `WeightSource.tensor`); a vocabulary matrix with fewer or more
    rows than this model's padded vocabulary is cut or completed with seeded rows."""
    def full(name: str, shape: tuple[int, ...]) -> torch.Tensor:
        try:
            t = read(name)
        except KeyError:
            raise KeyError(f"the weights to start from have no tensor {name!r}") from None
        if tuple(t.shape) == shape:
            return t
        if name in VOCAB_ROWS and tuple(t.shape[1:]) == shape[1:]:
            out = full_init(name, shape, args, seed)
            rows = min(t.shape[0], shape[0])
            out[:rows] = t[:rows]
            return out
        raise ValueError(f"{name}: the weights to start from have shape {tuple(t.shape)}, the model {shape}")
    return full


@torch.no_grad()
def init_weights(named_params: Iterable[tuple[str, torch.Tensor]], full_shapes: dict[str, tuple[int, ...]],
                 full: FullTensor, tp_rank: int = 0) -> None:
    """Initialise parameters given by REFERENCE name; `full_shapes` gives each one's unsharded shape."""
    for name, param in named_params:
        whole = full(name, full_shapes[name])
        param.copy_(local_slice(whole, param, tp_rank).to(param.dtype))
        del whole


def reference_shapes(args: ModelArgs) -> dict[str, tuple[int, ...]]:
    """Unsharded shape of every parameter of the reference model, by name (tied head omitted)."""
    d, hd, v = args.dim, args.head_dim, args.vocab_size
    shapes: dict[str, tuple[int, ...]] = {"tok_embeddings.weight": (v, d), "norm.weight": (d,)}
    if not args.tie_embeddings:
        shapes["output.weight"] = (v, d)
    for i in range(args.n_layers):
        p = f"layers.{i}."
        shapes.update({
            p + "attention_norm.weight": (d,), p + "ffn_norm.weight": (d,),
            p + "attention.wq.weight": (args.n_heads * hd, d), p + "attention.wk.weight": (args.kv_heads * hd, d),
            p + "attention.wv.weight": (args.kv_heads * hd, d), p + "attention.wo.weight": (d, args.n_heads * hd),
            p + "feed_forward.w1.weight": (args.hidden_dim, d), p + "feed_forward.w3.weight": (args.hidden_dim, d),
            p + "feed_forward.w2.weight": (d, args.hidden_dim),
        })
        if args.qk_norm:
            shapes.update({p + "attention.q_norm.weight": (hd,), p + "attention.k_norm.weight": (hd,)})
    return shapes


def init_model(model: torch.nn.Module, args: ModelArgs, seed: int, tp_rank: int = 0,
               rename=lambda name: name, weights: Callable[[str], torch.Tensor] | None = None) -> None:
    """Initialise a model whose parameter names map to reference names through `rename` (identity for the
    reference Transformer, the pipeline's map for a PipelineModule): seeded, or from `weights` (a reader of
    whole reference-named tensors) when given."""
    shapes = reference_shapes(args)
    full = seeded(args, seed) if weights is None else from_weights(weights, args, seed)
    init_weights(((rename(n), p) for n, p in model.named_parameters()), shapes, full, tp_rank)
