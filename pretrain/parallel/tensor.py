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
                                           copy_to_tensor_model_parallel_region,
                                           gather_from_sequence_parallel_region,
                                           gather_from_tensor_model_parallel_region)
from megatron.core.tensor_parallel.cross_entropy import VocabParallelCrossEntropy
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes

from pretrain import kernels
from pretrain.model.layers import LayerFactory
from pretrain.model.loss_chunks import bytes_per_logit
from pretrain.model.transformer import Attention


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


class _VocabHead(_Column):
    """Column-parallel output head (logits split over the vocabulary). With targets it returns the mean loss,
    computed in token chunks (pretrain.kernels.linear_cross_entropy) with megatron-core's vocab-parallel softmax
    per chunk: neither the whole (B, T, V/tp) logits nor the full vocabulary ever sit on one rank. z-loss as the
    reference head (pretrain.model.layers.VocabHead): in training mode, every TP rank recording the same term."""

    def __init__(self, *args, z_loss: float = 0.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.z_loss = kernels.ZLoss(z_loss) if z_loss > 0 else None

    def forward(self, x: torch.Tensor, targets: torch.Tensor | None = None, scores: bool = False) -> torch.Tensor:
        if targets is None:
            return super().forward(x)  # (B, T, V/tp)
        if self.sequence_parallel:  # x holds T/tp tokens: gather them (backward: reduce-scatter of dh)
            h, rows = gather_from_sequence_parallel_region(_seq_first(x)), targets.t()  # (T, B, D), (T, B)
        else:  # identity forward; backward sums each rank's partial dh (its vocab slice's share) over TP
            h, rows = copy_to_tensor_model_parallel_region(x), targets
        if scores:  # (B, T, 2): each target's log p and whether it is the argmax over the whole vocabulary
            start = parallel_state.get_tensor_model_parallel_rank() * self.weight.shape[0]
            out = kernels.token_scores(h.flatten(0, 1), self.weight, rows.flatten(), VOCAB_PARALLEL, start,
                                       parallel_state.get_tensor_model_parallel_group()).view(*rows.shape, 2)
            return out.transpose(0, 1) if self.sequence_parallel else out
        return kernels.linear_cross_entropy(h.flatten(0, 1), self.weight, rows.flatten(), VOCAB_PARALLEL,
                                            z_loss=self.z_loss if self.training else None)


class VocabParallelChunkLoss:
    """One chunk's loss rows and logits' gradient over this rank's vocab slice, by megatron-core's own steps of
    its vocab-parallel cross-entropy (the max, the target's logit and the sum of exponentials all-reduced over
    the tensor-parallel group), with the gradient taken in the same call (pretrain.kernels.linear_cross_entropy).
    The log-sum-exp over the whole vocabulary is log(sum of exponentials) + max, both already reduced: z-loss
    needs no collective more, and scales this rank's softmax slice by 1 + 2 * z_loss * lse."""

    def bytes_per_logit(self, dtype: torch.dtype) -> int:
        return bytes_per_logit(dtype.itemsize, in_place=False)  # megatron's fp32 copy + the cast gradient

    def __call__(self, logits, targets, grad_scale, z_loss=0.0):
        group = parallel_state.get_tensor_model_parallel_group()
        start = parallel_state.get_tensor_model_parallel_rank() * logits.shape[-1]
        ce = VocabParallelCrossEntropy
        logits32, logits_max = ce.calculate_logits_max(logits)
        torch.distributed.all_reduce(logits_max, op=torch.distributed.ReduceOp.MAX, group=group)
        target_mask, masked_target, predicted, sum_exp, exp_logits = ce.calculate_predicted_logits(
            logits32, targets, logits_max, start, start + logits.shape[-1])
        torch.distributed.all_reduce(predicted, group=group)
        torch.distributed.all_reduce(sum_exp, group=group)
        lse = sum_exp.log() + logits_max  # over the whole vocabulary: both pieces were reduced over TP
        softmax, loss = ce.calculate_cross_entropy_loss(exp_logits, predicted, sum_exp)
        if grad_scale is None:
            return loss, lse, None
        if z_loss:
            softmax.mul_((1.0 + 2.0 * z_loss * lse).unsqueeze(-1))  # + 2 z_loss lse softmax: z-loss's gradient
        grad_2d, rows, update, grad = ce.prepare_gradient_calculation_operands(softmax, target_mask)
        grad = ce.calculate_gradients(grad_2d, rows, masked_target, update, grad, grad_scale)
        return loss, lse, grad.to(logits.dtype)


VOCAB_PARALLEL = VocabParallelChunkLoss()


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

    def vocab_head(self, dim, vocab_size, z_loss=0.0):
        return _VocabHead(dim, vocab_size, config=self.config, init_method=_no_init, bias=False, gather_output=False,
                          z_loss=z_loss)

    def full_logits(self, logits):
        """The vocab shards joined (decoding, no gradient). megatron-core's gather_from_tensor_model_parallel_region
        allocates its output with torch.cuda.current_device(), so on CPU the shards are gathered here."""
        if logits.is_cuda:
            return gather_from_tensor_model_parallel_region(logits)
        group = parallel_state.get_tensor_model_parallel_group()
        shards = [torch.empty_like(logits) for _ in range(self.tp)]
        torch.distributed.all_gather(shards, logits.contiguous(), group=group)
        return torch.cat(shards, dim=-1)


def all_reduce_partial_grads(model: torch.nn.Module, sequence_parallel: bool) -> None:
    """Replicated parameters (whole on every TP rank) of which each TP rank computes only part of the gradient:
    - the QK-norm weights (`model.qk_norm`): shared by all heads, but a rank normalises only its own H/tp query
      and K/tp key heads, so its gradient is its heads' share (transformers' Qwen3 TP plan calls them
      "replicated_with_grad_allreduce");
    - under sequence parallelism every replicated parameter (the RMSNorm weights): a rank sees T/tp tokens (the
      QK-norm weights are among them then: each parameter is summed once, which covers both).
    megatron-core sums such gradients in its own DDP, which we do not use (DeepSpeed is our DDP). A gradient hook
    sums them over the TP group as soon as they are computed, before DeepSpeed reduces over DP; the sum is the same
    on every TP rank, which the grad norm's count of replicated parameters (on TP rank 0 only) assumes."""
    group = parallel_state.get_tensor_model_parallel_group()

    def hook(grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        torch.distributed.all_reduce(grad, group=group)
        return grad

    head_norms = {id(m.q_norm.weight) for m in model.modules() if isinstance(m, Attention) and m.qk_norm}
    head_norms |= {id(m.k_norm.weight) for m in model.modules() if isinstance(m, Attention) and m.qk_norm}
    for param in model.parameters():
        if getattr(param, "tensor_model_parallel", False):
            continue
        if sequence_parallel or id(param) in head_norms:
            param.register_hook(hook)
