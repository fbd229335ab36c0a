"""The model as a DeepSpeed pipeline: embedding, blocks, final norm + head, with the loss as `loss_fn`.

A pipeline layer takes one value and returns one value: the hidden states `h (B, T, D)`, or `(h, doc_ids)` when
document masking is on (DeepSpeed sends tensors of fixed shape between stages, so the (B, T) doc_ids ride along
and each stage's first block derives the document boundaries from them once per micro-batch). Layers are
`LayerSpec`s, so a stage builds only the layers it owns, and partitioning balances the number of transformer
blocks per stage (`type:PipeBlock`; embedding lands on the first stage, head on the last, where `PipeLoss` runs
it with the targets).

Names: DeepSpeed registers layer i as module "i", so a parameter is "3.attention.wq.weight". `reference_name`
maps it back to the reference model's "layers.2.attention.wq.weight": checkpoints are read back (export,
generate, re-slicing) under the same names whatever the layout.
"""
from __future__ import annotations

import re

import torch
from deepspeed.pipe import LayerSpec, PipelineModule
from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology
from megatron.core import parallel_state as ps
from torch import nn

from pretrain.model.args import ModelArgs
from pretrain.model.documents import Documents
from pretrain.model.layers import LayerFactory
from pretrain.model.transformer import Checkpointing, RMSNorm, TransformerBlock

Activation = torch.Tensor | tuple[torch.Tensor, torch.Tensor]


def _split(inputs: Activation) -> tuple[torch.Tensor, torch.Tensor | None]:
    return (inputs[0], inputs[1]) if isinstance(inputs, (tuple, list)) else (inputs, None)


def _join(h: torch.Tensor, doc_ids: torch.Tensor | None) -> Activation:
    return h if doc_ids is None else (h, doc_ids)


def pipeline_input(tokens: torch.Tensor, docs: Documents | None) -> Activation:
    """What the first stage is fed: the tokens, with the doc ids when document masking is on."""
    return _join(tokens, None if docs is None else docs.ids)


class _StageDocuments:
    """The document boundaries of the micro-batch a stage is running. The stage's first block derives them from
    the doc_ids that arrived with the activations (on CUDA, one read of the boundary count per micro-batch and
    stage); the stage's later blocks, which run that same micro-batch next, reuse them."""

    def __init__(self):
        self.docs: Documents | None = None


class PipeEmbedding(nn.Module):
    def __init__(self, args: ModelArgs, factory: LayerFactory):
        super().__init__()
        self.tok_embeddings = factory.vocab_embedding(args.vocab_size, args.dim)

    def forward(self, inputs: Activation) -> Activation:
        tokens, doc_ids = _split(inputs)
        return _join(self.tok_embeddings(tokens), doc_ids)


class PipeBlock(TransformerBlock):
    first_on_stage = True  # build_pipeline links a stage's blocks to one _StageDocuments
    stage_docs: _StageDocuments | None = None

    def forward(self, inputs: Activation) -> Activation:  # type: ignore[override]
        h, doc_ids = _split(inputs)
        docs = None
        if doc_ids is not None:
            if self.first_on_stage or self.stage_docs is None or self.stage_docs.docs is None:
                self.stage_docs = self.stage_docs or _StageDocuments()
                self.stage_docs.docs = Documents.from_ids(doc_ids)
            docs = self.stage_docs.docs
        return _join(super().forward(h, docs), doc_ids)


class PipeHead(nn.Module):
    """Final norm + output head on the last stage. It hands the normed hidden states to `PipeLoss`, which runs the
    head with the targets (DeepSpeed gives labels only to loss_fn): the loss is computed chunk by chunk inside the
    head and the (B, T, V) logits never exist (pretrain.kernels.linear_cross_entropy)."""

    def __init__(self, args: ModelArgs, factory: LayerFactory, z_loss: float = 0.0):
        super().__init__()
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = factory.vocab_head(args.dim, args.vocab_size, z_loss)

    def forward(self, inputs: Activation) -> torch.Tensor:
        h, _ = _split(inputs)
        return self.norm(h)  # (B, T, D)


class PipeLoss:
    """loss_fn(h, targets): the same mean token loss the reference model computes, by the last stage's head (its
    z-loss included, in training mode), or, while `scores` is set, the per-target scores evaluation asks for
    (DeepSpeed hands labels to loss_fn only)."""

    def __init__(self):
        self.head: PipeHead | None = None  # set once the last stage has built its layers
        self.scale = 1.0  # the engine's fault injection sets NaN for one step
        self.scores = False  # evaluation: each target's (log p, is the argmax) (B, T, 2), not the mean loss

    def __call__(self, h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if self.scores:
            return self.head.output(h, targets, scores=True)
        return self.head.output(h, targets) * self.scale


def build_pipeline(args: ModelArgs, factory: LayerFactory, pp: int, tp: int, dp: int,
                   checkpointing: Checkpointing = "none", z_loss: float = 0.0) -> PipelineModule:
    if args.tie_embeddings:
        raise ValueError("tied embeddings across pipeline stages are not supported (config rejects it)")
    topology = PipeModelDataParallelTopology(num_pp=pp, num_mp=tp, num_dp=dp)
    _check_same_groups(topology)
    layers = [LayerSpec(PipeEmbedding, args, factory)]
    layers += [LayerSpec(PipeBlock, args, factory, i, checkpointing) for i in range(args.n_layers)]
    layers += [LayerSpec(PipeHead, args, factory, z_loss)]
    loss = PipeLoss()
    module = PipelineModule(layers=layers, topology=topology, loss_fn=loss, partition_method="type:PipeBlock")
    loss.head = next((m for m in module.forward_funcs if isinstance(m, PipeHead)), None)  # None off the last stage
    stage_docs = _StageDocuments()
    for i, block in enumerate(m for m in module.forward_funcs if isinstance(m, PipeBlock)):
        block.first_on_stage, block.stage_docs = i == 0, stage_docs
    return module


def _check_same_groups(topology: PipeModelDataParallelTopology) -> None:
    """DeepSpeed's grid and megatron-core's groups must put this rank at the same (pipe, data, model) coordinate,
    or TP all-reduces and pipeline sends would pair up different ranks."""
    rank = torch.distributed.get_rank()
    coord = topology.get_coord(rank)
    ours = (ps.get_pipeline_model_parallel_rank(), ps.get_data_parallel_rank(), ps.get_tensor_model_parallel_rank())
    if (coord.pipe, coord.data, coord.model) != ours:
        raise RuntimeError(f"rank {rank}: DeepSpeed topology says (pipe, data, model)={tuple(coord)} but "
                           f"megatron-core says {ours}; the two rank orders disagree")


_PIPE_NAME = re.compile(r"^(\d+)\.(.+)$")


def reference_name(name: str, n_layers: int) -> str:
    """'0.tok_embeddings.weight' -> itself without the index; 'i.<rest>' -> 'layers.{i-1}.<rest>' for blocks;
    'n+1.norm.weight' / 'n+1.output.weight' -> 'norm.weight' / 'output.weight'."""
    m = _PIPE_NAME.match(name)
    if not m:
        raise ValueError(f"not a pipeline parameter name: {name!r}")
    idx, rest = int(m.group(1)), m.group(2)
    if idx == 0 or idx == n_layers + 1:
        return rest
    return f"layers.{idx - 1}.{rest}"
