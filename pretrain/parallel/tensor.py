"""The tensor-parallel build: megatron-core's parallel layers answer what the model asks for.

Megatron-core layers return `(output, bias)` and take sequence-first `[T, B, D]` activations; our model is
batch-first and wants a tensor back. The thin subclasses below adapt both. Without sequence parallelism the
layers only act on the last dim, so `(B, T, D)` goes straight through. With sequence parallelism (CUDA only in
megatron-core) the residual stream is split along T between TP ranks and megatron gathers/scatters along dim 0,
so those wrappers transpose to `[T, B, D]` around the call; attention itself always sees the whole sequence
because it runs between a column-parallel (all-gather) and a row-parallel (reduce-scatter) linear.

Initialisation is not megatron's: layers are built with `perform_initialization=False` (which also keeps the CUDA
RNG tracker out of the CPU path) and `pretrain.model.init` copies each rank's slice of the seeded full tensor in.
"""
from __future__ import annotations

import torch
from megatron.core import ModelParallelConfig, parallel_state
from megatron.core.tensor_parallel import (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding,
                                           gather_from_tensor_model_parallel_region,
                                           vocab_parallel_cross_entropy)
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes

from pretrain.model.layers import LayerFactory


def _no_init(weight: torch.Tensor) -> None:
    """megatron-core requires an init_method; ours runs afterwards (pretrain.model.init)."""


def _seq_first(x: torch.Tensor) -> torch.Tensor:
    return x.transpose(0, 1).contiguous()


def _mark_split(weight: torch.Tensor, dim: int) -> None:
    """megatron-core tags a TP-split weight only inside its own init (skipped here); DeepSpeed's grad norm and our
    init/consolidation read the tags, so set them: split along `dim`, contiguous chunks (stride 1)."""
    if not hasattr(weight, "tensor_model_parallel"):
        set_tensor_model_parallel_attributes(weight, True, dim, 1)


class _Column(ColumnParallelLinear):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        _mark_split(self.weight, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, in) -> (B, T, out/tp)
        if self.sequence_parallel:  # x holds T/tp tokens; megatron all-gathers along dim 0
            return _seq_first(super().forward(_seq_first(x))[0])
        return super().forward(x)[0]


class _Row(RowParallelLinear):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        _mark_split(self.weight, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, in/tp) -> (B, T, out) summed over TP
        if self.sequence_parallel:  # megatron reduce-scatters along dim 0: out holds T/tp tokens
            return _seq_first(super().forward(_seq_first(x))[0])
        return super().forward(x)[0]


class _Embedding(VocabParallelEmbedding):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        _mark_split(self.weight, 0)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:  # (B, T) -> (B, T, D), or (B, T/tp, D) under SP
        out = super().forward(tokens)
        return _seq_first(out) if self.reduce_scatter_embeddings else out


def model_parallel_config(tp: int, pp: int, sequence_parallel: bool, dtype: torch.dtype) -> ModelParallelConfig:
    return ModelParallelConfig(
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, sequence_parallel=sequence_parallel,
        # Build on CPU (megatron-core's GPU allocation path calls torch.cuda); DeepSpeed moves the module later.
        use_cpu_initialization=True, perform_initialization=False, params_dtype=torch.float32,
        # megatron-core refuses pp > 1 without it (it sizes p2p buffers); DeepSpeed does our p2p, but keep it valid.
        pipeline_dtype=dtype if pp > 1 else None,
        gradient_accumulation_fusion=False,
    )


class TensorParallelFactory(LayerFactory):
    """megatron-core Column/Row/VocabParallel layers over the tensor-parallel group of `parallel_state`."""

    def __init__(self, config: ModelParallelConfig):
        self.config = config
        self.tp = config.tensor_model_parallel_size  # the resolved layout's, via the config: one source of tp
        if parallel_state.get_tensor_model_parallel_world_size() != self.tp:
            raise RuntimeError(f"model-parallel config says tp={self.tp} but megatron-core's groups have "
                               f"{parallel_state.get_tensor_model_parallel_world_size()} ranks")
        self.tp_rank = parallel_state.get_tensor_model_parallel_rank()
        self.sequence_parallel = bool(config.sequence_parallel and self.tp > 1)

    def column_linear(self, in_features, out_features):
        return _Column(in_features, out_features, config=self.config, init_method=_no_init, bias=False,
                       gather_output=False)

    def row_linear(self, in_features, out_features):
        return _Row(in_features, out_features, config=self.config, init_method=_no_init, bias=False,
                    input_is_parallel=True, skip_bias_add=False)

    def vocab_embedding(self, vocab_size, dim):
        return _Embedding(vocab_size, dim, config=self.config, init_method=_no_init,
                          reduce_scatter_embeddings=self.sequence_parallel)

    def vocab_head(self, dim, vocab_size):
        # Logits stay split over the vocabulary: the loss below never materialises the full (B, T, V).
        return _Column(dim, vocab_size, config=self.config, init_method=_no_init, bias=False, gather_output=False)

    def cross_entropy(self, logits, targets):
        """Mean over the B*T tokens of megatron's vocab-parallel cross-entropy (softmax across TP shards)."""
        return vocab_parallel_cross_entropy(logits.float(), targets).mean()

    def full_logits(self, logits):
        return gather_from_tensor_model_parallel_region(logits)


def all_reduce_sequence_parallel_grads(model: torch.nn.Module) -> None:
    """Under sequence parallelism each TP rank sees T/tp tokens, so the replicated parameters (RMSNorm weights)
    get partial gradients; megatron-core sums them in its own DDP, which we do not use (DeepSpeed is our DDP).
    A gradient hook sums them over the TP group as soon as they are computed, before DeepSpeed reduces over DP."""
    group = parallel_state.get_tensor_model_parallel_group()

    def hook(grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        torch.distributed.all_reduce(grad, group=group)
        return grad

    for param in model.parameters():
        if not getattr(param, "tensor_model_parallel", False):
            param.register_hook(hook)
