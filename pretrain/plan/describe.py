"""`pretrain plan` / `--dry-run`: layout, parameter count, per-rank memory, fit on a GPU, and a layout ranking.

Model states (bytes per parameter a rank holds, as DeepSpeed 0.19 allocates them when its step begins): weights
2 (bf16) or 4 (fp32); gradients 4 (fp32 either way: bf16 runs accumulate in fp32, `data_types.grad_accum_dtype`),
and under bf16 with ZeRO <= 1 the bf16 `.grad` of every weight besides (+2); optimizer: fp32 master copy (bf16
only) + Adam's two moments = 12 or 8. ZeRO-1 partitions the optimizer over DP, ZeRO-2 also the gradients (the
bf16 ones are reduced into the fp32 partition as they come), ZeRO-3 also the weights, and allocates a reduce
bucket of 5e8 elements in the model dtype (DeepSpeed's default `reduce_bucket_size`, counted in buffers; in fp32
under context parallelism: DeepSpeed then communicates gradients in `seq_parallel_communication_data_type`, fp32).
The ZeRO partitions span the ranks that hold the same weights: dp x cp (`Layout.weight_replicas`).
tests/plan/test_measured.py checks this against the tensors DeepSpeed really holds (2 gloo ranks).

Activations: the bytes autograd saves for backward, counted tensor by tensor from this project's block (S = B*T
tokens of a micro-batch, D dim, F FFN width, H/K query/key-value heads, hd head dim, a = 2 (bf16) or 4 bytes):
- RMSNorm, eager: an fp32 view/copy of x (4), the normalized x (a), and its product with the weight (a), which
  the following linears save as their input: (4 + 2a)*S*D, + 4*S for 1/rms. Fused (Triton): x (a) and 1/rms;
  the output (a) the linears save: 2a*S*D + 4*S.
- attention: q after RoPE (H heads), k and v (K heads: SDPA's enable_gqa, on CUDA's flash kernel and PyTorch's
  CPU one alike), the output (H heads), a*S*hd bytes per head each, and the log-sum-exp (4*S per query head).
  RoPE saves only its cos/sin table (persistent, not counted). With `model.qk_norm` the query and key norms (H + K
  heads of hd) save what RMSNorm saves (below), per head 1/rms (4*S), their outputs going to RoPE, which keeps
  none of them.
- SwiGLU, eager: silu's input, silu's output, the up projection, and the product w2 reads: 4a*S*F. Fused: the
  gate and up projections and the product: 3a*S*F.
- recompute `selective` (op-level, pretrain/model/recompute.py): the block input (a*S*D) and the outputs of the
  matmuls and attention: q, k, v (H + 2K heads), attention's output (H heads) and log-sum-exp, wo and w2 (D
  wide: a row-parallel matmul's partial sums, all-reduced in place), w1 and w3 (F/tp); SP's all-gathers and
  reduce-scatters are re-run, not kept. The norms, RoPE and SwiGLU products are re-made during the block's
  backward (transient). `full`: the block input only, plus one block's activations re-made during its backward
  (transient).
- tensor parallelism splits heads and F over tp; without sequence parallelism the norms and block inputs are
  held whole on every TP rank, with it they are split along T (megatron-core saves its local, not the gathered,
  input of a column-parallel linear; our wrappers hand it a transposed copy per linear, counted as such).
- context parallelism (DeepSpeed-Ulysses, pretrain/parallel/context.py): a rank holds T/cp tokens of every
  tensor outside attention; attention's all-to-all hands it all T tokens of H/(tp*cp) query heads and K*r/(tp*cp)
  key/value heads (r = `kv_replicas`, copies made before the exchange when K/tp does not split cp ways), the same
  bytes as T/cp tokens of H/tp and K*r/tp heads: every term above is counted for S = B*T/cp, SDPA's k and v for
  K*r heads (the norms of `qk_norm` act before the exchange: K heads). The all-to-all saves nothing itself, but
  its output after attention is a new tensor, which wo saves as its input (a*S*D/tp, as SP's transposed copy; at
  cp = 1 wo's input is SDPA's own output). Under selective recompute the exchanges are re-run in backward, not
  kept: what is kept is the same list as above at S = B*T/cp. The loss head acts on T/cp tokens.
- pipeline: DeepSpeed's 1F1B schedule keeps min(pp - stage, micro-batches) micro-batches in flight on a stage
  (`TrainSchedule.num_pipe_buffers`); stage 0 holds the most, the last stage holds the head.
- head (last stage): the final norm's input as above, and what the chunked loss head
  (pretrain.kernels.linear_cross_entropy) keeps from forward to backward: the gradients of its input (a*S*D,
  the whole sequence even under SP) and of its weight (a*V*D/tp). Transient, on top of everything saved: one
  chunk of c tokens' logits at `loss_chunks.bytes_per_logit` (c from the same rule the head runs), and under bf16
  the weight gradient's fp32 sum plus one chunk's bf16 product ((4 + a)*V*D/tp). No term grows with S*V.
  The head before chunking (`Kernels.whole_logits`, as transformers' LlamaForCausalLM has it) kept the logits
  for backward (fused: a*S*V, eager: the fp32 log-softmax, 4*S*V) and its backward made their gradient at once:
  fused a*S*V (the Triton kernel writes it in the logits' dtype), eager 8*S*V (nll's fp32 gradient and
  log-softmax's, both alive). Those constants reproduce the four peaks measured on an H200 with that head
  (tests/plan/test_gpu_figures.py); the 125m preset's +33% came from counting (4 + a)*S*V for the fused
  backward, 6 GiB more than the kernel allocates at 32768 x 50304.
tests/plan/test_activations.py and test_measured.py measure all of this with saved-tensor hooks (eager path, CPU,
1 and 2 TP ranks, PP=2, CP=2). Not counted: the CUDA context, NCCL and DeepSpeed communication buffers, allocator
fragmentation: the fit verdict keeps `HEADROOM` of the GPU's memory for them.

Step time (for ranking layouts): model FLOPs plus recompute at `efficiency` x the GPU's peak (each of tp x pp x cp
ranks computing its share), the pipeline bubble (pp - 1)/(m + pp - 1) of the compute, and communication at the
stated link bandwidths, not overlapped (an upper bound): TP all-reduces (or SP all-gather + reduce-scatter, the
same bytes) of the block output, 2 per block forward and 2 backward (+2 under full recompute, and under selective
with SP); CP's all-to-alls of q, k, v and attention's output, 4 per block forward and 4 backward (+4 under
selective or full recompute), each moving (cp - 1)/cp of a rank's tensor (`all_to_all_bytes`), over NVLink when
tp x cp <= GPUs per node, else InfiniBand; PP sends of each micro-batch's activation forward and its gradient
backward; DP x CP all-reduce (ZeRO-0) or reduce-scatter of fp32 gradients + all-gather of the updated weights
(ZeRO-1/2), ZeRO-3 also gathering the weights for every micro-batch's forward and backward.
Ring collectives move 2(n-1)/n (all-reduce) or (n-1)/n of the bytes over the slowest link the group spans.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

from pretrain.config import Config, ConfigError
from pretrain.run.layout import Layout, kv_replicas
from pretrain.model.args import ModelArgs
from pretrain.model.flops import flops_per_token, matmul_params
from pretrain.model.loss_chunks import bytes_per_logit, chunk_tokens
from pretrain.plan.hardware import Links, gpu_memory_gib, known_gpus
from pretrain.run.resolved import ResolvedRun, resolve_run

GiB = 1024**3
ZERO3_REDUCE_BUCKET = 500_000_000  # elements: DeepSpeed's reduce_bucket_size default, allocated by ZeRO-3
HEADROOM = 0.10  # of GPU memory kept for the CUDA context, NCCL/DeepSpeed buffers and fragmentation



def size_text(n_bytes: float) -> str:
    return f"{n_bytes / GiB:.2f} GiB" if n_bytes >= GiB else f"{n_bytes / 1024**2:.2f} MiB"


@dataclass(frozen=True)
class Kernels:
    """Which code computes the model's norms, SwiGLU and loss: decides what autograd saves. Attention is SDPA
    with enable_gqa on every device (CUDA flash, PyTorch's CPU flash), so K/V are saved K heads wide either way."""
    fused: bool = True  # Triton RMSNorm / SwiGLU / cross-entropy (CUDA with model.fused_kernels); False: eager
    # The output head before it ran in chunks (whole logits kept for backward), for reading figures measured with
    # it and for peers that still have it (transformers); this project's head never holds them.
    whole_logits: bool = False

    @classmethod
    def cpu(cls) -> "Kernels":
        return cls(fused=False)


def block_activations(args: ModelArgs, tokens: int, tp: int, sp: bool, recompute: str, a: int,
                      k: Kernels, cp: int = 1) -> tuple[float, float]:
    """(saved, transient) bytes of one block for one micro-batch of `tokens` = B*T on one TP (and CP) rank.

    Under context parallelism a rank holds T/cp tokens of every tensor outside attention, and attention (after
    its all-to-all) all T tokens of H/cp query heads and K*r/cp key/value heads: the same bytes as T/cp tokens of
    H and K*r heads, so every term below is counted for S = B*T/cp tokens, with K*r for the keys and values
    attention saves (r = `kv_replicas`, the copies made when K/tp does not split cp ways)."""
    S, D, F, hd = tokens / cp, args.dim, args.hidden_dim, args.head_dim
    H, K = args.n_heads / tp, args.kv_heads / tp
    # key/value heads through the all-to-all (and so in attention): repeated first when they do not split cp ways
    Kx = K * kv_replicas(args.n_heads // tp, args.kv_heads // tp, cp) if cp > 1 else K
    seq = tp if sp else 1  # the residual stream and norms are split along T only under sequence parallelism
    norm = (S * D * (a if k.fused else 4 + a) + 4 * S) / seq  # what RMSNorm saves, its output aside
    # The norm's output is saved by the linears that read it: once (one tensor) without SP; under SP each
    # column-parallel linear saves its own [T/tp, B, D] transposed copy (pretrain/parallel/tensor.py) and the
    # row-parallel wo one of the attention output (wq, wk, wv: 3 copies; w1, w3: 2; wo: 1).
    norm_out = S * D * a / seq
    attn_in, mlp_in = norm_out * (3 if sp else 1), norm_out * (2 if sp else 1)
    # q and k after RoPE, v, the output and its log-sum-exp, as SDPA saves them; the row-parallel wo's own copy of
    # its input: under SP a transposed one, under CP the output all-to-all's result (else it is SDPA's output)
    attention = S * hd * a * (2 * H + 2 * Kx) + 4 * S * H + (S * D / tp * a if sp or cp > 1 else 0)
    if args.qk_norm:  # RMSNorm of each head's q and k (before RoPE, and before CP's all-to-all: K heads, not K*r)
        attention += S * (H + K) * (hd * (a if k.fused else 4 + a) + 4)
    mlp = S * F / tp * a * (3 if k.fused else 4)
    block_input = S * D * a / seq
    attention_sub_block = norm + attn_in + attention
    mlp_sub_block = norm + mlp_in + mlp
    everything = attention_sub_block + mlp_sub_block
    if recompute == "full":
        return block_input, everything
    if recompute == "selective":  # pretrain/model/recompute.py: matmul, attention and collective outputs kept
        # (CP's all-to-alls write into buffers: not kept, re-run in backward, as are K/V's copies)
        kept = (S * hd * a * (2 * H + 2 * K) + 4 * S * H  # q, k, v projections; attention's output and lse
                + 2 * S * D * a + 2 * S * F / tp * a)  # wo, w2 (whole D: partial sums, reduced in place); w1, w3
        return block_input + kept, max(0.0, everything - kept)  # the cheap ops' tensors, re-made in backward
    return everything, 0.0


def head_activations(args: ModelArgs, tokens: int, tp: int, sp: bool, a: int, k: Kernels,
                     chunk: int = 0) -> tuple[float, float]:
    """(saved, transient) bytes of the final norm + output head + loss for one micro-batch on one TP rank;
    `chunk`: model.loss_chunk_tokens (0: the head's own sizing)."""
    S, D, V = tokens, args.dim, args.vocab_size / tp
    seq = tp if sp else 1
    norm = (S * D * (a if k.fused else 4 + a) + 4 * S) / seq  # what the final RMSNorm saves, its output aside
    in_place = k.fused and tp == 1  # the Triton loss; with TP, megatron-core's vocab-parallel steps (fp32 copy)
    if k.whole_logits:
        head_input = S * D * a / seq  # the linear saved the norm's output
        return norm + head_input + S * V * (a if in_place else 4), S * V * (a if in_place else 8)
    logit_bytes = bytes_per_logit(a, in_place)
    c = chunk_tokens(S, int(V), logit_bytes, chunk)
    saved = norm + S * D * a + V * D * a  # + the gradients of the head's input and weight, made in forward
    fp32_sum = (4 + a) * V * D if a != 4 else 0
    return saved, c * V * logit_bytes + fp32_sum


@dataclass(frozen=True)
class Estimate:
    """Per-rank memory (bytes) of the most loaded rank, and the numbers a throughput prediction needs."""
    layout: Layout
    args: ModelArgs
    params: int
    weights: float
    grads: float
    optimizer: float
    activations: float  # saved for backward, all in-flight micro-batches, the worst pipeline stage
    transient: float    # made and freed within a step (a recomputed block, one chunk of the loss head)
    buffers: float      # DeepSpeed's pipeline send/receive buffers
    in_flight: int      # micro-batches alive on the worst stage
    worst_stage: int

    @property
    def model_states(self) -> float:
        return self.weights + self.grads + self.optimizer

    @property
    def total(self) -> float:
        return self.model_states + self.activations + self.transient + self.buffers

    @property
    def saved_state(self) -> float:
        """Bytes the most loaded rank writes per checkpoint: its weights (the module's, on its DP rank 0) and its
        optimizer partition (fp32 master and Adam's moments). A background save keeps as much host memory per
        rank (pretrain.checkpoint.files.Staging), pinned on CUDA."""
        return self.weights + self.optimizer


def model_states(params_here: float, dp: int, zero: int, weight_bytes: int, grad_bytes: int = 4,
                 optim_bytes: int = 12) -> tuple[float, float, float]:
    """(weights, grads, optimizer) bytes on one rank holding `params_here` before ZeRO partitioning."""
    return (params_here * weight_bytes / (dp if zero >= 3 else 1),
            params_here * grad_bytes / (dp if zero >= 2 else 1),
            params_here * optim_bytes / (dp if zero >= 1 else 1))


def planned_run(cfg: Config, world_size: int, vocab_size: int | None = None) -> ResolvedRun:
    """The ResolvedRun of this config at this world size, with `vocab_size` standing in for the tokenizer's when
    given (planning, and the layout ranking's many candidates: the shards are not read again for each). Layout and
    padded model shape come from pretrain.run.resolved, derived once."""
    if vocab_size is None and cfg.model.vocab_size is None:
        return resolve_run(cfg, world_size)  # a description, not this host's run: no memory check here
    no_data = cfg.model_copy(update={"data": cfg.data.model_copy(update={"path": "", "val_path": None})})
    return resolve_run(no_data, world_size, require_data=False, vocab_without_data=vocab_size)


def estimate(cfg: Config, world_size: int, vocab_size: int | None = None, kernels: Kernels | None = None, *,
             run: ResolvedRun | None = None) -> Estimate:
    """`run`: the run already resolved (dry run, plan); else resolved here from `vocab_size` (layout ranking)."""
    run = run or planned_run(cfg, world_size, vocab_size)  # raises ConfigError on any invalid layout
    lay, args = run.layout, run.model
    k = kernels or Kernels(fused=cfg.model.fused_kernels)
    total = args.num_params()
    # Per-rank share: blocks split over PP and TP; embeddings/head split over TP and sit on first/last stage.
    embed = args.vocab_size * args.dim * (1 if args.tie_embeddings else 2)
    blocks = total - embed
    embed_here = embed if lay.pp == 1 else args.vocab_size * args.dim  # the worst stage holds one of them
    per_rank = (blocks / lay.pp + embed_here) / lay.tp
    bf16 = cfg.train.dtype == "bf16"
    a = 2 if bf16 else 4
    z = cfg.parallel.zero_stage
    # ZeRO partitions over the ranks that hold the same weights: DP x CP (DeepSpeed's sequence-data-parallel group)
    weights, grads, optim = model_states(per_rank, lay.weight_replicas, z, a, 4 + (2 if bf16 and z <= 1 else 0),
                                         12 if bf16 else 8)
    worst = max(stage_activations(cfg, lay, args, k), key=lambda s: s.total)
    # ZeRO-3's reduce bucket is in the gradients' communication dtype: the model's, but under context parallelism
    # DeepSpeed's `seq_parallel_communication_data_type` (default fp32) replaces it
    bucket = ZERO3_REDUCE_BUCKET * (4 if lay.cp > 1 else a) if z == 3 else 0
    return Estimate(lay, args, total, weights, grads, optim, worst.saved, worst.transient, worst.buffers + bucket,
                    worst.in_flight, worst.stage)


@dataclass(frozen=True)
class StageActivations:
    stage: int
    in_flight: int     # micro-batches whose activations are alive at once (1F1B)
    saved: float
    transient: float
    buffers: float

    @property
    def total(self) -> float:
        return self.saved + self.transient + self.buffers


def stage_activations(cfg: Config, lay: Layout, args: ModelArgs, k: Kernels) -> list[StageActivations]:
    """Activation bytes per pipeline stage on one rank (one entry when pp = 1)."""
    S = lay.micro_batch_size * cfg.train.seq_len
    sp, a = cfg.parallel.sequence_parallel, (2 if cfg.train.dtype == "bf16" else 4)
    blk_saved, blk_transient = block_activations(args, S, lay.tp, sp, cfg.model.activation_checkpointing, a, k,
                                                 lay.cp)
    # the head acts on this rank's T/cp tokens of each sequence
    head_saved, head_transient = head_activations(args, S // lay.cp, lay.tp, sp, a, k, cfg.model.loss_chunk_tokens)
    boundary = S * args.dim * a / (lay.tp if sp else 1)  # one micro-batch's hidden states between stages (cp = 1)
    stages = []
    for stage in range(lay.pp):
        in_flight = min(lay.pp - stage, lay.grad_accum)  # DeepSpeed TrainSchedule.num_pipe_buffers
        last = stage == lay.pp - 1
        saved = in_flight * (args.n_layers // lay.pp * blk_saved + (head_saved if last else 0))
        transient = max(blk_transient, head_transient if last else 0)
        buffers = in_flight * boundary * ((stage > 0) + (not last))
        stages.append(StageActivations(stage, in_flight, saved, transient, buffers))
    return stages


def fit_line(e: Estimate, gpu: str) -> str:
    """Whether the estimate fits the GPU (less HEADROOM), and by how much it does or does not."""
    cap = gpu_memory_gib(gpu)
    if cap is None:
        raise ConfigError(f"--gpu {gpu}: unknown GPU memory; one of {known_gpus()}")
    usable = cap * GiB * (1 - HEADROOM)
    need = e.total
    if need <= usable:
        return (f"fits {gpu} ({cap:g} GiB, {usable / GiB:.1f} GiB usable after {HEADROOM:.0%} headroom): "
                f"~{size_text(need)} per rank, {size_text(usable - need)} to spare")
    return (f"DOES NOT FIT {gpu} ({cap:g} GiB, {usable / GiB:.1f} GiB usable after {HEADROOM:.0%} headroom): "
            f"~{size_text(need)} per rank, {size_text(need - usable)} over ({need / usable:.2f}x)")


def fits(e: Estimate, gpu: str) -> bool:
    return e.total <= (gpu_memory_gib(gpu) or 0) * GiB * (1 - HEADROOM)


def describe(cfg: Config, world_size: int, vocab_size: int | None = None, gpu: str | None = None, *,
             run: ResolvedRun | None = None, ranks_per_node: int | None = None) -> str:
    e = estimate(cfg, world_size, vocab_size, run=run)
    lay, args, T = e.layout, e.args, cfg.train.seq_len
    stage = f" on pipeline stage {e.worst_stage} ({e.in_flight} micro-batches in flight)" if lay.pp > 1 else ""
    lines = [
        f"layout: {layout_text(lay)}; ZeRO-{cfg.parallel.zero_stage}"
        f"{f' over dp x cp = {lay.weight_replicas}' if lay.cp > 1 else ''}; "
        f"{cfg.train.dtype}{'; sequence parallel' if cfg.parallel.sequence_parallel else ''}"
        f"{f'; context parallel: {T // lay.cp:,} of {T:,} tokens per rank' if lay.cp > 1 else ''}",
        f"batch: micro {lay.micro_batch_size} x accum {lay.grad_accum} x dp {lay.dp} = {lay.global_batch} "
        f"sequences = {lay.global_batch * T:,} tokens per step",
        f"model: {cfg.model.flavor} dim={args.dim} layers={args.n_layers} heads={args.n_heads}/{args.kv_heads} "
        f"ffn={args.hidden_dim}{' qk_norm' if args.qk_norm else ''} vocab={lay.padded_vocab_size} (padded) "
        f"params={e.params:,} ({e.params / 1e9:.3f} B)",
        f"per-rank memory estimate: weights {size_text(e.weights)}, grads {size_text(e.grads)}, optimizer "
        f"{size_text(e.optimizer)}, activations ~{size_text(e.activations)} saved + {size_text(e.transient)} in backward"
        f"{' + ' + size_text(e.buffers) + ' pipeline buffers' if e.buffers else ''} (recompute "
        f"{cfg.model.activation_checkpointing}{', fused kernels' if cfg.model.fused_kernels else ', eager ops'})"
        f"{stage}; total ~{size_text(e.total)}",
    ]
    lines.append(host_line(e, cfg.checkpoint.background, ranks_per_node))
    if gpu is not None:
        lines.append(fit_line(e, gpu))
    return "\n".join(lines)


def layout_text(lay: Layout) -> str:
    """`world=8 = tp 1 x cp 4 x pp 1 x dp 2` (cp only when it is > 1)."""
    return f"world={lay.world} = {lay.shape_text}"


def host_line(e: Estimate, background: bool, ranks_per_node: int | None) -> str:
    """A checkpoint's size per rank and, with background saves, the host memory they keep for it."""
    line = f"checkpoint: ~{size_text(e.saved_state)} written per rank per save"
    if not background:
        return line + " (checkpoint.background=false: no host copy is kept)"
    node = (f", at most {size_text(e.saved_state * ranks_per_node)} per node of {ranks_per_node}" if ranks_per_node
            else "")  # at most: only DP rank 0 of each model slice writes the module's weights
    return (line + f"; background saves keep as much host memory per rank{node} (pinned on CUDA, exactly that "
            "size; checkpoint.background=false keeps none)")


def throughput(cfg: Config, e: Estimate, peak_tflops: float, mfu: float) -> str:
    """What the cluster would do at a given MFU: tokens/s, step time, and days to the run's token budget.

    MFU is an input, not an output: it is what benchmarks/mfu.py measures on one node of the target hardware.
    """
    T = cfg.train.seq_len
    tokens_per_s = mfu * peak_tflops * 1e12 * e.layout.world / flops_per_token(e.args, T, e.args.vocab_size)
    step_tokens = e.layout.global_batch * T
    run_tokens = step_tokens * cfg.train.max_steps
    return (f"throughput at {mfu:.0%} MFU of {peak_tflops:g} TFLOP/s per GPU: {tokens_per_s:,.0f} tokens/s "
            f"({tokens_per_s / e.layout.world:,.0f} per GPU), {step_tokens / tokens_per_s:.2f} s per step; "
            f"train.max_steps={cfg.train.max_steps:,} = {run_tokens / 1e9:,.1f} B tokens in "
            f"{run_tokens / tokens_per_s / 86400:.1f} days")


# ------------------------------------------------------------------------------------- layout ranking


@dataclass(frozen=True)
class Ranked:
    tp: int
    cp: int
    pp: int
    zero: int
    recompute: str
    micro: int
    step_s: float
    mfu: float
    memory: float


def step_time(cfg: Config, e: Estimate, peak_tflops: float, efficiency: float, gpus_per_node: int,
              links: Links) -> float:
    """Predicted seconds per optimizer step of this layout (module docstring: what is counted)."""
    lay, args, T = e.layout, e.args, cfg.train.seq_len
    S, m, a = lay.micro_batch_size * T, lay.grad_accum, (2 if cfg.train.dtype == "bf16" else 4)
    s = S / lay.cp  # tokens a rank holds outside attention (each CP rank computes 1/cp of every matmul and of
    # attention: T/cp tokens through the projections, all T for H/cp heads in attention)
    attn_fwd = 4.0 * args.n_layers * args.n_heads * args.head_dim * T  # per token, QK^T and AV forward
    block_params = matmul_params(args, args.vocab_size) - args.vocab_size * args.dim
    # selective re-runs no matmul, attention or collective (pretrain/model/recompute.py): its elementwise
    # recompute is not counted
    extra = 2.0 * block_params + attn_fwd if cfg.model.activation_checkpointing == "full" else 0.0
    per_mb_flops = (flops_per_token(args, T, args.vocab_size) + extra) * S / (lay.tp * lay.pp * lay.cp)
    compute = per_mb_flops / (peak_tflops * 1e12 * efficiency)
    single_node = lay.world <= gpus_per_node
    tp_bw = (links.nvlink if lay.tp <= gpus_per_node else links.ib) * 1e9
    recompute = cfg.model.activation_checkpointing
    sp = cfg.parallel.sequence_parallel
    resent = 2 if recompute == "full" or (recompute == "selective" and sp) else 0  # SP: gathers/scatters re-run
    all_reduces = args.n_layers / lay.pp * (4 + resent)
    tp_comm = all_reduces * 2 * (lay.tp - 1) / lay.tp * s * args.dim * a / tp_bw if lay.tp > 1 else 0.0
    pp_bw = (links.nvlink if single_node else links.ib) * 1e9
    pp_comm = 2 * s * args.dim * a / lay.tp / pp_bw if lay.pp > 1 else 0.0
    per_mb = compute + tp_comm + pp_comm + context_parallel_time(cfg, lay, args, gpus_per_node, links)
    dp, z = lay.weight_replicas, cfg.parallel.zero_stage  # gradients averaged, ZeRO partitioned over DP x CP
    params = (e.params - args.vocab_size * args.dim * (0 if args.tie_embeddings else 1)) / lay.pp / lay.tp
    dp_bw = (links.nvlink if lay.tp * dp <= gpus_per_node else links.ib) * 1e9
    frac = (dp - 1) / dp
    dp_bytes = 2 * frac * params * 4 if z == 0 else frac * params * (4 + a)
    if z == 3:
        dp_bytes += m * 2 * frac * params * a  # weights gathered for every forward and backward
    return (m + lay.pp - 1) * per_mb + dp_bytes / dp_bw


def all_to_all_bytes(args: ModelArgs, tokens: int, tp: int, cp: int, a: int) -> float:
    """Bytes one rank exchanges (sends, and as many receives) in one block's forward under context parallelism:
    (cp - 1)/cp of each of q (H/tp heads), k and v (K*r/tp heads each, after their copies) and attention's output
    (H/tp heads), all for its T/cp tokens (`tokens` = B*T). Its backward exchanges the gradients of the same four."""
    if cp == 1:
        return 0.0
    H, K = args.n_heads // tp, args.kv_heads // tp
    heads = 2 * H + 2 * K * kv_replicas(H, K, cp)
    return (cp - 1) / cp * tokens / cp * heads * args.head_dim * a


def context_parallel_time(cfg: Config, lay: Layout, args: ModelArgs, gpus_per_node: int, links: Links) -> float:
    """Seconds of all-to-all per micro-batch on one rank: 4 exchanges per block forward, 4 backward, and under
    selective or full recompute the forward's 4 again (their outputs are not kept). Over NVLink when the CP group
    (tp x cp consecutive ranks: megatron-core orders tp fastest, then cp) lies within a node, else InfiniBand."""
    if lay.cp == 1:
        return 0.0
    a = 2 if cfg.train.dtype == "bf16" else 4
    passes = 2 + (cfg.model.activation_checkpointing in ("selective", "full"))
    bw = (links.nvlink if lay.tp * lay.cp <= gpus_per_node else links.ib) * 1e9
    per_block = all_to_all_bytes(args, lay.micro_batch_size * cfg.train.seq_len, lay.tp, lay.cp, a)
    return args.n_layers / lay.pp * passes * per_block / bw


def rank_layouts(cfg: Config, nodes: int, gpus_per_node: int, vocab_size: int, gpu: str, peak_tflops: float,
                 efficiency: float, links: Links = Links()) -> list[Ranked]:
    """Every (tp, cp, pp, zero, recompute, micro-batch) that keeps the config's global batch, passes the layout
    rules and fits the GPU, fastest first. Context parallelism (cp 2, 4, 8) is tried with pp = 1 only (the
    pipeline engine has no sequence-parallel group), where seq_len splits cp ways and the heads tp x cp ways."""
    world = nodes * gpus_per_node
    base = estimate(cfg, world, vocab_size).layout
    global_batch = base.global_batch
    T, heads = cfg.train.seq_len, cfg.model.args().n_heads
    out = []
    pows = [1, 2, 4, 8, 16, 32, 64]
    for tp, cp, pp, zero, recompute, micro in itertools.product(pows[:4], pows[:4], pows, (1, 2, 3),
                                                                ("none", "selective", "full"), (1, 2, 4, 8)):
        if tp > gpus_per_node or world % (tp * cp * pp) or (pp > 1 and zero >= 2):
            continue
        if cp > 1 and (pp > 1 or T % cp or heads % (tp * cp) or cfg.eval.tasks):  # the config's CP rules
            continue
        dp = world // (tp * cp * pp)
        if global_batch % (micro * dp):
            continue
        try:
            c = cfg.model_copy(update={
                "parallel": cfg.parallel.model_copy(update={"tp": tp, "cp": cp, "pp": pp, "zero_stage": zero,
                                                            "sequence_parallel": cfg.parallel.sequence_parallel
                                                            and tp > 1}),
                "model": cfg.model.model_copy(update={"activation_checkpointing": recompute}),
                "train": cfg.train.model_copy(update={"micro_batch_size": micro,
                                                      "grad_accum": global_batch // (micro * dp)})})
            e = estimate(c, world, vocab_size)
        except ConfigError:
            continue
        if not fits(e, gpu):
            continue
        t = step_time(c, e, peak_tflops, efficiency, gpus_per_node, links)
        mfu = flops_per_token(e.args, c.train.seq_len, e.args.vocab_size) * global_batch * c.train.seq_len / (
            t * world * peak_tflops * 1e12)
        out.append(Ranked(tp, cp, pp, zero, recompute, micro, t, mfu, e.total))
    return sorted(out, key=lambda r: (round(r.step_s, 3), r.memory))  # equal times: the smaller footprint first


def ranking_lines(ranked: list[Ranked], limit: int = 10, cfg: Config | None = None) -> list[str]:
    """The table of the fastest `limit` layouts; with `cfg`, a last line saying where the config's own layout
    stands among them."""
    if not ranked:
        return ["no layout of this global batch fits: fewer tokens per step, more nodes, or a larger GPU"]
    return _table(ranked, limit) + ([own_layout_line(ranked, cfg)] if cfg is not None else [])


def own_layout_line(ranked: list[Ranked], cfg: Config) -> str:
    p, recompute, micro = cfg.parallel, cfg.model.activation_checkpointing, cfg.train.micro_batch_size
    cp = f" x cp {p.cp}" if p.cp > 1 else ""
    own = (f"this config's layout (tp {p.tp}{cp} x pp {p.pp}, ZeRO-{p.zero_stage}, recompute {recompute}, "
           f"micro {micro})")
    place = next((i for i, r in enumerate(ranked) if (r.tp, r.cp, r.pp, r.zero, r.recompute, r.micro)
                  == (p.tp, p.cp, p.pp, p.zero_stage, recompute, micro)), None)
    if place is None:
        return f"{own} is not among them (it does not fit, or is not a candidate the ranking tries)"
    r = ranked[place]
    return (f"{own}: #{place + 1} of {len(ranked)}, {r.step_s:.2f} s per step, {r.mfu:.1%} MFU predicted "
            f"({r.step_s / ranked[0].step_s - 1:+.1%} against the fastest)")


def _table(ranked: list[Ranked], limit: int) -> list[str]:
    lines = [f"{len(ranked)} fitting layouts, fastest first (predicted; top {min(limit, len(ranked))}):",
             "   tp  cp  pp  zero  recompute  micro  step s   MFU  GiB/rank"]
    for r in ranked[:limit]:
        lines.append(f"  {r.tp:3d} {r.cp:3d} {r.pp:3d} {r.zero:5d}  {r.recompute:9s} {r.micro:6d} {r.step_s:7.2f} "
                     f"{r.mfu:5.1%} {r.memory / GiB:9.1f}")
    return lines
