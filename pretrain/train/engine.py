"""The model, wrapped for training under any layout: build, train step, eval step, save/load, consolidate.

One object hides which DeepSpeed engine runs underneath (the plain engine with megatron-core TP layers and an
mpu, or the pipeline engine with a PipelineModule); the train loop codes against `Engine` only.

Loss normalisation (what `StepResult.loss` and the gradient are the mean of): every micro-batch's loss is the
mean over its B*T next-token targets; DeepSpeed divides each micro-batch's loss by grad_accum before backward and
averages gradients over the data-parallel group. All micro-batches hold the same number of tokens (packed, fixed
length, no ignored targets), so this equals the mean over every token of the global batch, and it is what the
single-process reference computes on the whole global batch at once. Under context parallelism each rank's loss
is the mean over its T/cp tokens of the micro-batch; DeepSpeed sums gradients over DP x CP and divides by DP
only (its Ulysses convention), so each rank back-propagates its share of the CP group's token mean, loss / cp
(ZeRO-3 divides by DP x CP itself: pretrain.parallel.context.backward_loss_divisor).

With `train.z_loss` the model's forward (in training mode) returns cross-entropy + z-loss, the objective the
gradient is of; the head records the z-loss term of each micro-batch, and the step reports both apart:
`StepResult.loss` is the cross-entropy (the objective less the term; what validation, the spike detector and runs
without z-loss measure) and `StepResult.z_loss` the term, averaged like the loss, in the same one collective.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import deepspeed
import torch
from megatron.core import parallel_state

from pretrain import kernels
from pretrain.checkpoint import files as checkpoint_files
from pretrain.checkpoint import CheckpointError
from pretrain.checkpoint.reader import CheckpointReader
from pretrain.checkpoint.reshard import load_resliced
from pretrain.checkpoint.weights import WeightSource
from pretrain.config import Config
from pretrain.model.args import ModelArgs
from pretrain.model.documents import Documents
from pretrain.model.init import FullTensor, from_weights, init_model, local_slice, reference_shapes
from pretrain.model.layers import REFERENCE, LayerFactory
from pretrain.model.transformer import KVCache, Transformer, TransformerBlock
from pretrain.parallel.consolidate import consolidate
from pretrain.parallel.context import (apply_context_parallel, backward_loss_divisor, partition_zero3_over_dp_cp,
                                       sequence_slice)
from pretrain.parallel.fp8 import convert_to_fp8
from pretrain.parallel.mpu import MegatronMpu
from pretrain.parallel.optimizer import GuardedAdamW, global_grad_norm, param_groups
from pretrain.parallel.pipeline import build_pipeline, pipeline_input, reference_name
from pretrain.parallel.tensor import TensorParallelFactory, all_reduce_partial_grads, model_parallel_config
from pretrain.run.distributed import DistEnv
from pretrain.run.layout import kv_replicas
from pretrain.run.paths import MODEL_DIR
from pretrain.run.progress import progress
from pretrain.run.resolved import ResolvedRun
from pretrain.train.schedule import lr_at
from pretrain.train.stragglers import timed_collectives

Batch = dict[str, torch.Tensor]


@dataclass(frozen=True)
class StepResult:
    loss: float  # mean token loss over the global batch, the same on every rank
    grad_norm: float  # global L2 norm before clipping (inf/nan when the step was skipped)
    lr: float
    skipped: bool  # non-finite loss or gradient: no weight or optimizer-state change
    data_wait_s: float = 0.0  # this rank's wait for its micro-batches from the loader
    compute_s: float | None = None  # measured steps only: this rank's step time less its DeepSpeed collectives
    z_loss: float | None = None  # train.z_loss: the mean z-loss term, trained on beside `loss` (None when off)


def deepspeed_config(cfg: Config, dp: int) -> dict[str, Any]:
    """DeepSpeed's JSON config, generated from the typed config (never hand-written)."""
    t, p = cfg.train, cfg.parallel
    bf16 = t.dtype == "bf16"
    ds: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "train_batch_size": t.micro_batch_size * t.grad_accum * dp,
        # ZeRO-0 in fp32 clips in GuardedAdamW (DeepSpeed would clip but neither report the norm nor skip).
        "gradient_clipping": cfg.optim.grad_clip if _deepspeed_clips(cfg) else 0.0,
        "zero_optimization": {"stage": p.zero_stage},
        "bf16": {"enabled": bf16},
        # bf16 weights/activations, fp32 master weights in the optimizer and fp32 gradient accumulation.
        "data_types": {"grad_accum_dtype": "fp32"} if bf16 else {},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**12,
        "wall_clock_breakdown": False,
    }
    if p.zero_stage == 3:
        # Gather every parameter for each forward (no persistence shortcut): simplest, exact, small-model friendly.
        ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    return ds


def _deepspeed_clips(cfg: Config) -> bool:
    return cfg.parallel.zero_stage > 0 or cfg.train.dtype == "bf16"


def _factory(cfg: Config, run: ResolvedRun) -> LayerFactory:
    """The one decision between the reference layers and megatron-core's tensor-parallel ones (tp and pp from the
    resolved layout, handed to megatron-core through its config)."""
    if run.layout.tp == 1:
        return REFERENCE

    dtype = torch.bfloat16 if run.dtype == "bf16" else torch.float32
    return TensorParallelFactory(model_parallel_config(run.layout.tp, run.layout.pp,
                                                      cfg.parallel.sequence_parallel, dtype))


class Engine:
    def __init__(self, cfg: Config, env: DistEnv, ds_engine, run: ResolvedRun):
        self.cfg, self.env, self.ds, self.run = cfg, env, ds_engine, run
        self.args: ModelArgs = run.model  # vocab_size is the padded one
        self.vocab_size = run.vocab_size  # the tokenizer's
        self.pipeline = env.layout.pp > 1
        self.global_step = 0
        self._loss_scale = 1.0  # fault injection: set to nan for one step by inject_nonfinite()
        self.slow_s = 0.0  # fault injection: seconds every step of this rank spends before its first forward
        self.z_loss = _head_z_loss(ds_engine.module, self.pipeline)  # None off the last stage or without z-loss
        self._loss_divisor = backward_loss_divisor(env.layout.cp, cfg.parallel.zero_stage)

    # ------------------------------------------------------------------------------------------ steps

    def split(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, Documents | None]:
        """A loader batch -> (inputs, next-token targets, document boundaries when document masking is on): whole
        sequences, whatever the layout (under context parallelism the forward takes this rank's columns)."""
        tokens = batch["tokens"].to(self.env.device)  # (B, T+1)
        inputs, targets = tokens[:, :-1], tokens[:, 1:]  # (B, T) each: predict token t+1 from tokens <= t
        docs = None
        if self.cfg.model.document_mask:
            if "doc_ids" not in batch:
                raise ValueError("model.document_mask is on but the batch has no 'doc_ids'; "
                                 "enable doc ids in the loader or set model.document_mask=false")
            # boundaries found on the host, from the loader's CPU tensor: the step reads nothing back from the GPU
            docs = Documents.from_ids(batch["doc_ids"][:, :-1]).to(self.env.device)
        return inputs, targets, docs

    def _forward(self, inputs: torch.Tensor, targets: torch.Tensor, docs: Documents | None,
                 scores: bool = False) -> torch.Tensor:
        """The plain engine's forward of whole sequences. Under context parallelism this rank computes its T/cp
        columns of the inputs and targets; the documents stay those of the whole sequences, which attention sees
        after its all-to-all (pretrain/parallel/context.py)."""
        if self.env.layout.cp > 1:
            inputs, targets = (sequence_slice(t, self.env.layout.cp, self.env.cp_rank) for t in (inputs, targets))
        return self.ds(inputs, targets, docs, scores=scores)

    def inject_nonfinite(self) -> None:
        """Fault injection for tests and drills: the next train_step's loss is multiplied by NaN."""
        self._loss_scale = float("nan")

    def train_step(self, batch_iter: Iterator[Batch], measure: bool = False) -> StepResult:
        """One optimizer step over exactly grad_accum micro-batches pulled from batch_iter on every rank.
        `measure`: also this rank's compute time (pretrain/train/stragglers.py), at the cost of a device
        synchronisation after each of the step's DeepSpeed collectives."""
        with timed_collectives(measure) as comm:
            started = time.perf_counter()
            res = self._train_step(batch_iter)
            seconds = time.perf_counter() - started
        if measure:
            res = dataclasses.replace(res, compute_s=max(0.0, seconds - comm.seconds))
        return res

    def _train_step(self, batch_iter: Iterator[Batch]) -> StepResult:
        lr = lr_at(self.global_step, self.cfg.optim, self.cfg.train.max_steps)
        for group in self.ds.optimizer.param_groups:  # lr is a function of the step: nothing to resume
            group["lr"] = lr
        skipped_before = self.ds.skipped_steps
        waited = time.perf_counter()
        micro = [next(batch_iter) for _ in range(self.cfg.train.grad_accum)]
        waited = time.perf_counter() - waited
        if self.slow_s:
            time.sleep(self.slow_s)
        if self.pipeline:
            loss, z_loss = self._train_pipeline(micro)
        else:
            loss, z_loss = self._train_plain(micro)
        self._loss_scale = 1.0
        skipped = self.ds.skipped_steps > skipped_before
        if not math.isfinite(loss) and not skipped:
            raise RuntimeError("non-finite loss but the optimizer stepped: the skip guard failed")
        norm = self.ds.get_global_grad_norm()
        norm = float("nan") if norm is None else float(norm)
        self.global_step += 1
        return StepResult(loss=loss, grad_norm=norm if not skipped else float("inf"), lr=lr, skipped=skipped,
                          data_wait_s=waited, z_loss=z_loss)

    def _train_plain(self, micro: list[Batch]) -> tuple[float, float | None]:
        total = torch.zeros((), dtype=torch.float32, device=self.env.device)
        for batch in micro:
            inputs, targets, docs = self.split(batch)
            loss = self._forward(inputs, targets, docs) * self._loss_scale
            # scaled by 1/grad_accum inside; under CP by the share DeepSpeed needs (see the module docstring)
            self.ds.backward(loss / self._loss_divisor)
            self.ds.step()  # optimizer step (clip, skip guard) only at the accumulation boundary
            total += loss.detach().float()  # summed on the device: no host read per micro-batch
        # Mean over micro-batches, then over all ranks (TP/PP replicas hold the same value and CP ranks as many
        # tokens each, so this is the DP x CP mean): one collective and one host read per step.
        if self.cfg.train.z_loss == 0:
            return self.env.all_reduce_sum(total / len(micro)) / self.env.world_size, None
        z = self.z_loss.take()  # the micro-batches' z-loss terms, summed on the device
        loss, z = self.env.sums_of(torch.stack([total - z, z]) / len(micro))
        return loss / self.env.world_size, z / self.env.world_size

    def _train_pipeline(self, micro: list[Batch]) -> tuple[float, float | None]:
        self.ds.module.loss_fn.scale = self._loss_scale
        feed = []
        for batch in micro:
            inputs, targets, docs = self.split(batch)
            feed.append((pipeline_input(inputs, docs), targets))
        loss = float(self.ds.train_batch(iter(feed)))  # mean over micro-batches and DP, broadcast to every stage
        self.ds.module.loss_fn.scale = 1.0
        if self.cfg.train.z_loss == 0:
            return loss, None
        # The z-loss term lives on the last stage, the same on its TP ranks: its DP mean, to every rank.
        z = self.z_loss.take() / len(micro) if self.z_loss is not None else 0.0
        z = self.env.all_reduce_sum(z) / (self.env.layout.tp * self.env.layout.dp)
        return loss - z, z

    @torch.no_grad()
    def eval_step(self, batch_iter: Iterator[Batch]) -> float:
        """Mean token loss of one micro-batch per rank, averaged over DP ranks; the same on every rank."""
        progress()
        batch = next(batch_iter)
        inputs, targets, docs = self.split(batch)
        if self.pipeline:
            loss = float(self.ds.eval_batch(iter([(pipeline_input(inputs, docs), targets)]), num_micro_batches=1))
            self.ds.module.train()
        else:
            with self._eval_mode():
                loss = float(self._forward(inputs, targets, docs))
        return self.env.all_reduce_sum(loss) / self.env.world_size

    @torch.no_grad()
    def score(self, tokens: torch.Tensor, targets: torch.Tensor, docs: Documents | None = None) -> torch.Tensor:
        """Each target's (log p, is the argmax) as (B, T, 2) fp32 on every rank of this model replica (its TP x PP
        ranks, which must all call it with the same batch): evaluation's question, asked of the live weights.

        Any batch shape goes (evaluation batches vary): under PP the pipeline engine re-negotiates activation
        shapes before and after, so the next training step sends its own again. Every rank calls DeepSpeed's
        eval_batch, which begins with a barrier of all ranks: data-parallel replicas score in lockstep."""
        progress()  # a long evaluation is not a hang (pretrain/train/watchdog.py)
        tokens, targets = tokens.to(self.env.device), targets.to(self.env.device)
        if not self.pipeline:
            with self._eval_mode():
                out = self._forward(tokens, targets, docs, scores=True).float()
            return self._whole_columns(out)
        loss_fn, grid = self.ds.module.loss_fn, self.ds.grid
        loss_fn.scores = True
        self.ds.reset_activation_shape()
        self.ds.total_loss = None  # DeepSpeed adds each eval's output to the last one's: scores differ in shape
        try:
            outputs = self.ds.eval_batch(iter([(pipeline_input(tokens, docs), targets)]), compute_loss=True,
                                         reduce_output=None, bcast_loss=False, num_micro_batches=1)
        finally:
            loss_fn.scores = False
            self.ds.total_loss = None
            self.ds.reset_activation_shape()
            self.ds.module.train()
        last = grid.stage_to_global(stage_id=self.env.layout.pp - 1)
        out = outputs[0].float() if self.ds.is_last_stage() else torch.empty(
            (*targets.shape, 2), dtype=torch.float32, device=self.env.device)
        torch.distributed.broadcast(out, src=last, group=grid.get_pipe_parallel_group())
        return out

    def _whole_columns(self, out: torch.Tensor) -> torch.Tensor:
        """(B, T/cp, ...) per CP rank -> (B, T, ...) on each: the CP group's slices joined in rank order."""
        if self.env.layout.cp == 1:
            return out
        pieces = [torch.empty_like(out) for _ in range(self.env.layout.cp)]
        torch.distributed.all_gather(pieces, out.contiguous(), group=parallel_state.get_context_parallel_group())
        return torch.cat(pieces, dim=1)

    def new_cache(self) -> KVCache:
        """An empty KV cache of the model's context length for `decode` (this rank's heads)."""
        if self.pipeline or self.env.layout.cp > 1:
            raise RuntimeError("decoding needs the whole model and whole sequences on one rank (pp = 1, cp = 1)")
        return self.ds.module.new_cache(1, self.args.max_seq_len)

    @torch.no_grad()
    def decode(self, tokens: Sequence[int], start_pos: int, cache: KVCache) -> torch.Tensor:
        """Feed `tokens` at `start_pos` through the KV cache (pp = 1; every TP rank of the replica calls it): the
        next-token logits over the whole (padded) vocabulary, fp32."""
        progress()
        inp = torch.as_tensor([list(tokens)], dtype=torch.long, device=self.env.device)
        with self._eval_mode():
            logits = self.ds(inp, start_pos=start_pos, cache=cache)
        return self.ds.module.factory.full_logits(logits)[0, -1].float()

    @contextlib.contextmanager
    def _eval_mode(self) -> Iterator[None]:
        """The module in eval mode (no z-loss term, no dropout-like behaviour) for one forward, then back."""
        self.ds.eval()
        try:
            yield
        finally:
            self.ds.train()

    # ----------------------------------------------------------------------------------- checkpoints

    def save(self, step_dir: Path) -> None:
        """DeepSpeed's model + optimizer state under step_dir/model (all ranks; no `latest`: the caller's job)."""
        self.ds.save_checkpoint(str(step_dir), tag=MODEL_DIR, client_state={"global_step": self.global_step},
                                save_latest=False)

    def load(self, step_dir: Path) -> None:
        step_dir = Path(step_dir)
        if not (step_dir / MODEL_DIR).is_dir():
            raise CheckpointError(f"{step_dir}: no DeepSpeed checkpoint directory '{MODEL_DIR}' to load")
        try:
            path, client = self.ds.load_checkpoint(str(step_dir), tag=MODEL_DIR, load_optimizer_states=True,
                                                   load_lr_scheduler_states=False)
        except CheckpointError:  # a file refused or unreadable, by name (pretrain/checkpoint/files.py)
            raise
        except (RuntimeError, KeyError, ValueError, AssertionError, OSError, IndexError, TypeError, AttributeError,
                EOFError) as e:  # a file that loads but does not hold what DeepSpeed expects there
            if checkpoint_files.host_failure(e):
                raise
            reason = (str(e).strip().splitlines() or [""])[0][:300]
            raise CheckpointError(f"{step_dir}/{MODEL_DIR}: DeepSpeed could not load it ({type(e).__name__}: "
                                  f"{reason}); was it written with this layout (tp/pp/dp, ZeRO stage)?") from e
        if path is None:
            raise CheckpointError(f"{step_dir}/{MODEL_DIR}: DeepSpeed found no loadable checkpoint")
        if not client or "global_step" not in client:
            raise CheckpointError(f"{step_dir}/{MODEL_DIR}: checkpoint has no global_step (not written by Engine)")
        step = client["global_step"]
        if type(step) is not int or step < 0:
            raise CheckpointError(f"{step_dir}/{MODEL_DIR}: field global_step must be a whole number >= 0, not "
                                  f"{str(step)[:40]!r}")
        self.global_step = step

    def load_resliced(self, reader: CheckpointReader) -> None:
        """A checkpoint of another layout (tp/pp/dp/ZeRO/dtype): its fp32 master weights, Adam moments and step,
        re-sliced for this engine, whose module must have been built from the same checkpoint
        (`build_engine(init=reader)`; pretrain.checkpoint.resume checked it is the same model). Collective. See
        pretrain/checkpoint/reshard.py."""
        load_resliced(self.ds, reader, self.args, self.env.tp_rank, self._reference_name)
        self.global_step = reader.step

    def _reference_name(self, name: str) -> str:
        return _to_reference(self.args, self.pipeline)(name)

    def reference_state_dict(self) -> dict[str, torch.Tensor] | None:
        """Full fp32 weights with the reference model's names on rank 0 (None elsewhere); collective."""
        sd = consolidate(self.ds.module, self._reference_name, zero3=self.cfg.parallel.zero_stage == 3,
                         first_replica=self.env.dp_rank == 0 and self.env.cp_rank == 0)
        if sd is not None and self.args.tie_embeddings:
            sd["output.weight"] = sd["tok_embeddings.weight"]
        return sd


def build_engine(cfg: Config, env: DistEnv, run: ResolvedRun, init: WeightSource | None = None) -> Engine:
    """The resolved run's model (padded vocab, max_seq_len covering train.seq_len) built for this rank's slice of
    the layout, wrapped by DeepSpeed. Its starting weights are the seeded init, or `init` (`model.init_from`,
    already checked against this run): both layout-independent, each rank copying its slice of every whole tensor
    before DeepSpeed makes the master weights and optimizer state."""
    lay, args = run.layout, run.model
    if env.layout != lay:
        raise RuntimeError(f"process groups were made for {env.layout}, the run was resolved for {lay}")
    kernels.use_fused(cfg.model.fused_kernels and env.device.type == "cuda")  # CPU: eager, no triton import
    kernels.use_loss_chunk(cfg.model.loss_chunk_tokens)
    torch.manual_seed(cfg.train.seed)
    factory = _factory(cfg, run)
    ckpt = cfg.model.activation_checkpointing
    weights = init.tensor if init is not None else None
    rename = _to_reference(args, lay.pp > 1)
    if lay.pp > 1:
        module = build_pipeline(args, factory, lay.pp, lay.tp, lay.dp, ckpt, cfg.train.z_loss)
        init_model(module, args, cfg.train.seed, env.tp_rank, rename=rename, weights=weights)
        mpu = None  # the pipeline engine uses the PipelineModule's own grid (same groups, checked)
    else:
        module = Transformer(args, factory, ckpt, cfg.train.z_loss)
        init_model(module, args, cfg.train.seed, env.tp_rank, weights=weights)
        if lay.cp > 1:  # attention's all-to-all over the CP group; DeepSpeed learns the groups from the mpu
            apply_context_parallel(module, parallel_state.get_context_parallel_group(),
                                   kv_replicas(args.n_heads // lay.tp, args.kv_heads // lay.tp, lay.cp))
        mpu = MegatronMpu()
    if cfg.train.fp8 != "none":  # checked by init_distributed: CUDA with FP8 tensor cores, torchao, tp = 1
        convert_to_fp8(module, cfg.train.fp8)
    if cfg.model.compile:
        compile_blocks(module)
    if factory.tp > 1:  # QK-norm weights see this rank's heads, and under SP every norm this rank's tokens
        all_reduce_partial_grads(module, factory.sequence_parallel)

    o = cfg.optim
    own_clipping = not _deepspeed_clips(cfg)
    optimizer = GuardedAdamW(
        param_groups(module.named_parameters(), o.weight_decay), lr=lr_at(0, o, cfg.train.max_steps),
        betas=(o.beta1, o.beta2), eps=o.eps, grad_clip=o.grad_clip, own_clipping=own_clipping,
        # One multi-tensor kernel per step on GPU (torch's fused AdamW); CPU keeps the reference's for-each path.
        fused=env.device.type == "cuda" or None,
        norm_fn=lambda params: global_grad_norm(params, lay.weight_replicas, count_replicated=env.tp_rank == 0))
    ds_config = deepspeed_config(cfg, lay.dp)
    if lay.cp > 1 and cfg.parallel.zero_stage == 3:
        partition_zero3_over_dp_cp(module, ds_config, mpu, torch.bfloat16 if run.dtype == "bf16" else torch.float32)
    ds_engine, _, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, mpu=mpu, config=ds_config,
                                              dist_init_required=False)
    checkpoint_files.adopt_deepspeed(ds_engine)  # its files: hashed as written, read without running code
    if own_clipping and ds_engine.optimizer is not optimizer:
        raise RuntimeError("expected DeepSpeed to use GuardedAdamW directly with ZeRO-0/fp32")
    if init is not None and run.dtype == "bf16":
        _exact_masters(ds_engine, from_weights(init.tensor, args, cfg.train.seed), args, env.tp_rank, rename)
    return Engine(cfg, env, ds_engine, run)


def _head_z_loss(module: torch.nn.Module, pipeline: bool) -> kernels.ZLoss | None:
    """Where this rank's output head records its z-loss terms: None without z-loss and off the last stage."""
    head = module.loss_fn.head if pipeline else module  # a PipeHead (None off the last stage), or the Transformer
    return head.output.z_loss if head is not None else None


def compile_blocks(module: torch.nn.Module) -> None:
    """torch.compile each transformer block in place (torchtitan's per-block habit): every block has the same
    code and shapes, so one compiled graph serves all of them, and parameter names (checkpoints, re-slicing,
    export) are unchanged, which wrapping the whole model in torch.compile would not leave them. After FP8
    conversion, so the casts compile with the matmuls; the loss head and the pipeline plumbing stay eager."""
    for m in module.modules():
        if isinstance(m, TransformerBlock):
            m.compile()


def _to_reference(args: ModelArgs, pipeline: bool) -> Callable[[str], str]:
    """This engine's parameter name -> the reference model's (a PipelineModule numbers its layers "3.attention...");
    the one mapping init, the bf16 masters, re-slicing and consolidation all use."""
    return (lambda name: reference_name(name, args.n_layers)) if pipeline else (lambda name: name)


@torch.no_grad()
def _exact_masters(ds_engine, full: FullTensor, args: ModelArgs, tp_rank: int,
                   rename: Callable[[str], str]) -> None:
    """DeepSpeed's bf16 optimizers make the fp32 master weights from the bf16 module copy, which would round the
    weights a run starts from to bf16; write each one's full-precision slice into its master partition instead
    (DeepSpeed's own setter, whatever the ZeRO stage). Collective under ZeRO-3."""
    from deepspeed.utils import safe_set_full_fp32_param

    shapes = reference_shapes(args)
    for name, param in ds_engine.module.named_parameters():
        ref = rename(name)
        safe_set_full_fp32_param(param, local_slice(full(ref, shapes[ref]), param, tp_rank).float())
