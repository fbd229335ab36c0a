"""The one typed configuration of a run: YAML file -> `--set section.key=value` overrides -> validated objects.

Every field is typed and documented here; unknown keys are rejected with the key's dotted name (and the closest
valid one). Checks that need only the config live in the section validators; checks that need the world size
or the vocabulary (the parallel layout) live in `check_layout` / `resolve_layout`, which
`pretrain.run.resolved.resolve_run` runs for training, its `--dry-run` and the launcher's preflight alike, before any
process group or model exists.
"""
from __future__ import annotations

import difflib
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, FiniteFloat, ValidationError, field_validator, model_validator

from pretrain.model.args import FLAVORS, ModelArgs


class ConfigError(ValueError):
    """A bad config: the message is one line naming the key and what to do."""


# The bounds every numeric field shares. A float is finite: inf and nan pass `gt=0` and then crash a run (timedelta
# overflows) or corrupt it silently (lr=inf trains nan weights and commits them). A count is a whole number below
# 2**31: every count ends up in a C int (a tensor shape, DeepSpeed's config, a deque's maxlen), and long before that
# the memory check (`pretrain.plan.fit.check_memory`) refuses a shape that cannot fit. Each field adds the bounds
# its own meaning implies (positive, a fraction, ...).
MAX_COUNT = 2**31 - 1
Finite = FiniteFloat
Count = Annotated[int, Field(le=MAX_COUNT)]
Seed = Annotated[int, Field(ge=-(2**63), le=2**63 - 1)]  # what torch.manual_seed takes
MAX_TIMEOUT_S = 7 * 86400  # a week: timedelta and torch's millisecond timeouts overflow far beyond it


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelSection(_Section):
    flavor: str = Field("debug", description=f"named shape: one of {', '.join(FLAVORS)}")
    dim: Count | None = Field(None, gt=0, description="override the flavor's hidden size")
    n_layers: Count | None = Field(None, gt=0, description="override the flavor's number of blocks")
    n_heads: Count | None = Field(None, gt=0, description="override the flavor's query heads")
    n_kv_heads: Count | None = Field(None, gt=0, description="override the flavor's key/value heads (GQA)")
    vocab_size: Count | None = Field(None, gt=0, description="None: the tokenizer's size from the shard manifest")
    ffn_hidden_dim: Count | None = Field(None, gt=0, description="override the SwiGLU hidden width")
    rope_theta: Finite | None = Field(None, gt=1, le=1e12, description="override the RoPE base (> 1: the "
                                      "wavelengths grow with the dimension; long-context models use up to ~1e10)")
    norm_eps: Finite | None = Field(None, gt=0, lt=1, description="override the RMSNorm epsilon (small beside the "
                                    "mean square it is added to)")
    tie_embeddings: bool | None = Field(None, description="share the input embedding with the output head")
    init_std: Finite | None = Field(None, gt=0, le=1, description="override the init std")
    qk_norm: bool = Field(False, description="RMSNorm over each attention head's queries and keys before RoPE "
                          "(Qwen3's QK-norm: a weight of head_dim for queries and one for keys, shared by the heads); "
                          "bounds the attention logits. Such a model exports as transformers' Qwen3ForCausalLM")
    document_mask: bool = Field(False, description="attend only within a document inside a packed sequence "
                                "(CUDA bf16: varlen flash attention; elsewhere a dense mask)")
    activation_checkpointing: Literal["none", "full", "selective"] = Field(
        "none", description="recompute in backward: every block (full), or only the cheap ops between the kept matmul "
        "and attention outputs (selective: no matmul runs twice)")
    fused_kernels: bool = Field(True, description="use the Triton kernels on CUDA (always eager on CPU)")
    compile: bool = Field(False, description="torch.compile each transformer block (per block, as torchtitan "
                          "does); the first steps are slower while it compiles")
    loss_chunk_tokens: Count = Field(0, ge=0, description="tokens per chunk of the output head + loss (the logits "
                                     "are never held whole); 0: as many as fit 512 MiB of working memory")
    init_from: str | None = Field(None, description="start from these weights (a step_N dir, a run dir or a "
                                  "`pretrain import-hf` output): weights only, fresh optimizer, step 0; the model "
                                  "shape must match; ignored when resuming")
    init_from_any_tokenizer: bool = Field(False, description="allow init_from, or a resume, with shards made by "
                                          "another tokenizer than the checkpoint's (token ids then change meaning)")

    @field_validator("flavor")
    @classmethod
    def _known_flavor(cls, flavor: str) -> str:
        if flavor not in FLAVORS:
            raise ValueError(f"unknown flavor {flavor!r}; choose one of {', '.join(FLAVORS)}")
        return flavor

    def args(self, vocab_size: int | None = None) -> ModelArgs:
        """The flavor with this section's overrides applied; `vocab_size` fills in a vocab left as None."""
        base = FLAVORS[self.flavor]
        overrides = {k: v for k, v in self.model_dump().items()
                     if k in ModelArgs.__dataclass_fields__ and v is not None}
        args = base.replace(**overrides)
        if args.vocab_size is None and vocab_size is not None:
            args = args.replace(vocab_size=vocab_size)
        return args


class DataSection(_Section):
    path: str | list[str] = Field("", description="shard dir, glob, brace pattern, pipe: URL, or a list of them")
    weights: list[Finite] | None = Field(None, description="mixture weights, one per entry of `path`")
    val_path: str | list[str] | None = Field(None, description="held-out shards for validation loss, made with "
                                             "the training tokenizer; read in their own token proportions "
                                             "(data.weights apply to data.path only)")
    tokenizer: str | None = Field(None, description="the tokenizer the shards were made with (dir or file); None: "
                                  "the path recorded in the shard manifest. Copied into every checkpoint")
    num_workers: Count = Field(0, ge=0, description="dataloader worker processes per rank")
    shuffle_buffer: Count = Field(1000, ge=0, description="in-shard shuffle buffer (samples); 0 disables")
    reshard: bool = Field(False, description="restart the earliest saved epoch when a loader resume cannot be "
                          "exact (another dataset, seed or shuffle buffer, or some ranks' states missing); a DP or "
                          "worker change alone is re-split exactly without it")


class SpikeSection(_Section):
    """Loss-spike rollback (PaLM's manual recipe, automated): see pretrain/train/spikes.py."""
    enabled: bool = Field(False, description="watch loss and grad norm; on a confirmed spike restore the newest "
                          "checkpoint from before it and skip the data read since")
    window: Count = Field(100, ge=8, description="steps of recent history the median and spread are taken over; "
                          "until it is full, the loss is judged against the last 8 calm steps (from step 9)")
    threshold: Finite = Field(6.0, gt=0, le=1e6, description="robust z-score of the loss (above the median, in "
                              "scaled MADs) that makes a step suspicious")
    grad_norm_threshold: Finite = Field(12.0, ge=0, le=1e6, description="robust z-score of the grad norm that "
                                        "makes a step suspicious on its own (grad-norm spikes that leave the loss "
                                        "alone are common and clipped: hence higher than `threshold`); 0: loss only")
    confirm_steps: Count = Field(3, gt=0, description="suspicious steps in a row that confirm a spike")
    max_rollbacks: Count = Field(3, ge=0, description="rollbacks a run may take; one more spike stops it (exit 3)")
    skip_batches: Count = Field(0, ge=0, description="global batches skipped beyond those the spike window read "
                                "(the batches from the restored checkpoint up to the spike are always skipped)")
    max_skip_batches: Count = Field(64, ge=0, description="after a rollback, global batches judged forward-only "
                                    "(no update) and skipped while they are still spike-level, so one rollback gets "
                                    "past a whole poisoned stretch; 0: no look-ahead")


class TrainSection(_Section):
    max_steps: Count = Field(100, gt=0, description="optimizer steps to run")
    micro_batch_size: Count = Field(2, gt=0, description="sequences per rank per forward/backward")
    grad_accum: Count = Field(1, gt=0, description="micro-batches accumulated per optimizer step")
    seq_len: Count = Field(128, gt=0, description="tokens per training sequence")
    seed: Seed = Field(1234, description="seeds init, data order and dropout-free RNG streams")
    log_every: Count = Field(10, gt=0, description="print/log a metrics line every N steps")
    eval_every: Count = Field(0, ge=0, description="validation every N steps; 0 disables")
    eval_steps: Count = Field(10, gt=0, description="micro-batches per validation")
    dtype: Literal["fp32", "bf16"] = Field("fp32", description="compute dtype; bf16 keeps fp32 master weights")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: cuda if available else cpu")
    backend: Literal["auto", "gloo", "nccl"] = Field("auto", description="auto: nccl on cuda, gloo on cpu")
    max_nonfinite_steps: Count = Field(3, gt=0, description="abort after this many non-finite steps in a row")
    peak_tflops: Finite | None = Field(None, gt=0, le=1e5, description="per-device peak for MFU; None: looked up "
                                       "by GPU name")
    profile: tuple[Count, Count] | None = Field(None, description="[START, STEPS]: a torch profiler trace per rank "
                                                "of steps START..START+STEPS-1 in <checkpoint.dir>/profiles (and "
                                                "MLflow)")
    register_as: str | None = Field(None, description="at the end, export the final checkpoint for Hugging Face "
                                    "(<checkpoint.dir>/hf/step_N) and register it as a new version of this MLflow "
                                    "model (needs tracking.enabled)")
    fp8: Literal["none", "tensorwise", "rowwise"] = Field(
        "none", description="FP8 matmuls in the blocks' projections with torchao (CUDA, compute capability >= 8.9, "
        "tp = 1): tensorwise (fastest) or rowwise scaling")
    z_loss: Finite = Field(0.0, ge=0, le=1, description="PaLM's z-loss: this coefficient times log(Z)^2 per token "
                           "(Z = the sum of exp(logits) over the vocabulary) added to the training loss, which pulls "
                           "the softmax's log-normaliser toward 0 so the logits cannot drift upward together (PaLM: "
                           "1e-4); 0: off. `loss` and `val_loss` stay the cross-entropy; the term is logged as "
                           "`z_loss` (mean over tokens of coefficient x log(Z)^2)")
    spike: SpikeSection = Field(default_factory=SpikeSection)
    collective_timeout_s: Finite = Field(600.0, gt=0, le=MAX_TIMEOUT_S, description="a collective waiting longer "
                                         "than this for a dead or hung rank fails the run (every process group, "
                                         "torch's own and the libraries'), instead of hanging until the job's "
                                         "wall-clock limit; a week at most")
    straggler_ratio: Finite = Field(1.5, gt=1, le=1e6, description="a rank whose compute time on a logged step is "
                                    "this many times the median rank's (and 0.1 s more), 3 logged steps in a row, "
                                    "is named in a warning")
    hang_timeout_s: Finite | None = Field(None, gt=0, le=MAX_TIMEOUT_S, description="no step completed for this "
                                          "long: every rank writes its threads' stacks to <checkpoint.dir>/hangs/ and "
                                          "the run exits 43 (requeue); None: 20 x the median step time, at least "
                                          "300 s, below collective_timeout_s; must be below collective_timeout_s")


class OptimSection(_Section):
    lr: Finite = Field(3e-4, gt=0, description="peak learning rate")
    min_lr_ratio: Finite = Field(0.1, ge=0, le=1, description="final lr as a fraction of the peak")
    warmup_steps: Count = Field(10, ge=0, description="linear warmup steps")
    schedule: Literal["cosine", "linear", "wsd", "constant"] = Field("cosine", description="decay after warmup")
    decay_fraction: Finite = Field(0.2, gt=0, le=1, description="wsd: fraction of steps spent decaying")
    weight_decay: Finite = Field(0.1, ge=0, description="AdamW decoupled weight decay (not on norms); "
                                 "lr x weight_decay < 1")
    beta1: Finite = Field(0.9, ge=0, lt=1)
    beta2: Finite = Field(0.95, ge=0, lt=1)
    eps: Finite = Field(1e-8, gt=0, lt=1, description="added to sqrt(v) in Adam's update: small beside it")
    grad_clip: Finite = Field(1.0, ge=0, le=1e6, description="global grad-norm clip; 0 disables")

    @model_validator(mode="after")
    def _decay_below_one(self) -> "OptimSection":
        # AdamW multiplies every weight by (1 - lr x weight_decay) each step: at 1 or more it zeroes or flips them.
        if self.lr * self.weight_decay >= 1:
            raise ValueError(f"optim.lr={self.lr:g} x optim.weight_decay={self.weight_decay:g} must be < 1: AdamW "
                             "multiplies every weight by (1 - lr x weight_decay) each step")
        return self


class ParallelSection(_Section):
    tp: Count = Field(1, gt=0, description="tensor-parallel degree (megatron-core)")
    pp: Count = Field(1, gt=0, description="pipeline-parallel degree (DeepSpeed PipelineModule)")
    cp: Count = Field(1, gt=0, description="context-parallel degree (DeepSpeed-Ulysses): each rank holds "
                      "train.seq_len / cp tokens of every sequence; attention trades sequence for heads")
    zero_stage: int = Field(0, ge=0, le=3, description="DeepSpeed ZeRO stage")
    sequence_parallel: bool = Field(False, description="megatron-core sequence parallelism (CUDA only)")

    @model_validator(mode="after")
    def _deepspeed_rules(self) -> "ParallelSection":
        if self.pp > 1 and self.zero_stage >= 2:
            raise ValueError(f"parallel.zero_stage={self.zero_stage} with parallel.pp={self.pp}: DeepSpeed's "
                             "pipeline engine says ZeRO-2 and ZeRO-3 are incompatible with pipeline parallelism; "
                             "use zero_stage <= 1")
        if self.sequence_parallel and self.tp == 1:
            raise ValueError("parallel.sequence_parallel needs tp > 1")
        if self.cp > 1 and self.pp > 1:
            raise ValueError(f"parallel.cp={self.cp} with parallel.pp={self.pp}: DeepSpeed's pipeline engine has no "
                             "sequence-parallel group (it would average gradients over DP only); use pp=1 with cp")
        return self


class CheckpointSection(_Section):
    dir: str = Field("runs/debug", description="run directory: checkpoints, metrics.jsonl, mlruns")
    every: Count = Field(0, ge=0, description="checkpoint every N steps (and always at the end); 0: end only")
    keep: Count = Field(3, gt=0, description="complete checkpoints kept")
    resume: str = Field("auto", description="auto (from `latest` if any) | none | a step_N directory")
    final: bool = Field(True, description="checkpoint at the end of the run (benchmarks turn it off)")
    background: bool = Field(True, description="write, hash and commit on a background thread: training pauses "
                             "only while the state is copied to host memory")


class TrackingSection(_Section):
    enabled: bool = Field(True, description="log to MLflow")
    uri: str | None = Field(None, description="MLflow URI; None: $MLFLOW_TRACKING_URI or <checkpoint.dir>/mlruns")
    experiment: str = Field("pretrain", description="MLflow experiment name")
    run_name: str | None = Field(None, description="MLflow run name; None: the run directory's name")
    system_metrics_s: Finite = Field(30.0, ge=0, le=86400, description="seconds between samples of MLflow's "
                                     "system metrics (CPU, host memory, disk, network; GPUs with NVML), on each "
                                     "node's first rank; 0: off; a day at most")


class EvalSection(_Section):
    tasks: list[str] = Field(default_factory=list, description="lm-evaluation-harness tasks run on the training "
                             "ranks with the live weights every eval.every steps (needs the `eval` extra); [] = off")
    every: Count = Field(0, ge=0, description="run eval.tasks every N steps; 0 = off")
    limit: Finite | None = Field(None, gt=0, le=MAX_COUNT, description="documents per task (a whole number), or a fraction of "
                                 "each task (< 1); None = all")
    num_fewshot: Count | None = Field(None, ge=0, description="few-shot examples per prompt; None = the task's own")
    include_path: str | None = Field(None, description="a directory of extra lm-eval task YAML files")
    batch_size: Count = Field(8, gt=0, description="requests per forward")


class Config(_Section):
    model: ModelSection = Field(default_factory=ModelSection)
    data: DataSection = Field(default_factory=DataSection)
    train: TrainSection = Field(default_factory=TrainSection)
    optim: OptimSection = Field(default_factory=OptimSection)
    parallel: ParallelSection = Field(default_factory=ParallelSection)
    checkpoint: CheckpointSection = Field(default_factory=CheckpointSection)
    tracking: TrackingSection = Field(default_factory=TrackingSection)
    eval: EvalSection = Field(default_factory=EvalSection)

    @model_validator(mode="after")
    def _cross_section(self) -> "Config":
        if self.train.dtype == "bf16" and self.parallel.zero_stage == 0:
            # DeepSpeed 0.19 without ZeRO either refuses bf16 weights with fp32 gradient accumulation or steps the
            # bf16 weights directly: no fp32 master copy.
            raise ValueError("train.dtype=bf16 needs parallel.zero_stage >= 1: DeepSpeed keeps fp32 master "
                             "weights only in its ZeRO optimizers (ZeRO-1 costs no extra memory); set "
                             "parallel.zero_stage=1")
        if self.train.profile is not None and min(self.train.profile) < 1:
            raise ValueError(f"train.profile={list(self.train.profile)}: [first step, number of steps], both >= 1")
        if self.train.spike.enabled and self.checkpoint.every == 0:
            raise ValueError("train.spike.enabled needs checkpoint.every > 0: a rollback restores the newest "
                             "checkpoint from before the spike")
        if self.train.register_as and not self.tracking.enabled:
            raise ValueError("train.register_as needs tracking.enabled=true: the model version is registered "
                             "under the MLflow run that trained it")
        split = self.parallel.tp * self.parallel.cp
        if self.parallel.sequence_parallel and self.train.seq_len % split != 0:
            over = f"parallel.tp={self.parallel.tp}" + (f" x parallel.cp={self.parallel.cp}" if self.parallel.cp > 1
                                                        else "")
            raise ValueError(f"train.seq_len={self.train.seq_len} is not divisible by {over}: sequence parallelism "
                             "splits each rank's tokens evenly over TP ranks")
        if self.train.seq_len % self.parallel.cp != 0:
            raise ValueError(f"train.seq_len={self.train.seq_len} is not divisible by parallel.cp="
                             f"{self.parallel.cp}: context parallelism gives each rank an equal slice of the sequence")
        if self.eval.tasks and self.parallel.cp > 1:
            raise ValueError(f"eval.tasks with parallel.cp={self.parallel.cp}: in-loop evaluation runs on tp x pp "
                             "replicas; evaluate the checkpoints with `pretrain eval` (any layout) instead")
        if self.train.fp8 != "none" and self.parallel.tp != 1:
            raise ValueError(f"train.fp8={self.train.fp8} needs parallel.tp=1: torchao's float8 linears replace "
                             f"nn.Linear, and megatron-core's tensor-parallel linears are not converted")
        hang = self.train.hang_timeout_s
        if hang is not None and hang >= self.train.collective_timeout_s:
            raise ValueError(f"train.hang_timeout_s={hang:g} must be below train.collective_timeout_s="
                             f"{self.train.collective_timeout_s:g}: the stacks are written before a collective's "
                             "timeout ends the run without them")
        if bool(self.eval.tasks) != (self.eval.every > 0):
            raise ValueError("eval.tasks and eval.every go together: name the tasks and how often to run them "
                             f"(now tasks={self.eval.tasks}, every={self.eval.every})")
        if self.eval.limit is not None and self.eval.limit >= 1 and self.eval.limit != int(self.eval.limit):
            raise ValueError(f"eval.limit={self.eval.limit}: a whole number of documents, or a fraction below 1")
        if self.data.weights is not None:
            paths = self.data.path if isinstance(self.data.path, list) else [self.data.path]
            if len(self.data.weights) != len(paths):
                raise ValueError(f"data.weights has {len(self.data.weights)} entries but data.path has "
                                 f"{len(paths)}; give one weight per dataset")
            if any(w < 0 for w in self.data.weights) or sum(self.data.weights) <= 0:
                raise ValueError(f"data.weights {self.data.weights}: token shares must be >= 0 and not all zero")
        return self

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)

    def flat(self) -> dict[str, Any]:
        """Dotted key -> value, for MLflow params."""
        out: dict[str, Any] = {}
        for section, values in self.model_dump(mode="json").items():
            for key, value in values.items():
                if isinstance(value, dict):  # a nested section: train.spike.window
                    out.update({f"{section}.{key}.{sub}": v for sub, v in value.items()})
                else:
                    out[f"{section}.{key}"] = value
        return out


# ----------------------------------------------------------------------------------------------- loading


# libyaml's parser where PyYAML was built with it (the wheels are): the same documents and errors, about ten times
# faster than the pure-Python one, which a dry run otherwise spends half its time in.
_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def _load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a safe loader, C or Python


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form section.key=value")
    key, raw = item.split("=", 1)
    parts = key.strip().split(".")
    if len(parts) not in (2, 3) or not all(parts):
        raise ConfigError(f"override key {key!r} must be section.key or section.key.field (e.g. "
                          "train.max_steps=20, train.spike.enabled=true)")
    if not raw.strip():
        return parts, ""
    try:
        return parts, _load_yaml(raw)
    except (yaml.YAMLError, ValueError) as e:  # ValueError: an integer longer than Python converts (4300 digits)
        why = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"--set {key.strip()}: {raw[:40]!r}{'...' if len(raw) > 40 else ''} is not a YAML value "
                          f"({why})") from None


def _suggest(name: str, options: list[str]) -> str:
    close = difflib.get_close_matches(name, options, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _check_keys(raw: dict[str, Any], where: str) -> None:
    """Unknown keys, named with their dotted path and the closest valid key."""
    sections = Config.model_fields
    for section, values in raw.items():
        if section not in sections:
            raise ConfigError(f"{where}: unknown section {section!r}{_suggest(section, list(sections))}")
        if values is None:
            raw[section] = values = {}
        if not isinstance(values, dict):
            raise ConfigError(f"{where}: section {section!r} must be a mapping, got {type(values).__name__}")
        model_fields = sections[section].annotation.model_fields  # type: ignore[union-attr]
        fields = list(model_fields)
        for key, value in values.items():
            if key not in fields:
                raise ConfigError(f"{where}: unknown key '{section}.{key}'{_suggest(key, fields)}")
            nested = model_fields[key].annotation
            if isinstance(nested, type) and issubclass(nested, BaseModel) and isinstance(value, dict):
                inner = list(nested.model_fields)
                for sub in value:
                    if sub not in inner:
                        raise ConfigError(f"{where}: unknown key '{section}.{key}.{sub}'{_suggest(sub, inner)}")


def _one_line(err: ValidationError, where: str) -> ConfigError:
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"])
    msg = first["msg"].removeprefix("Value error, ")
    if loc and msg.startswith(f"{loc}."):  # a section's own rule that names its dotted keys
        loc = ""
    value = first.get("input")
    shown = "" if isinstance(value, dict) else f" (got {value!r})"
    return ConfigError(f"{where}: {loc}: {msg}{shown}" if loc else f"{where}: {msg}{shown}")


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """File -> overrides -> validated Config. Raises ConfigError with a one-line message."""
    raw: dict[str, Any] = {}
    where = "config"
    if path is not None:
        path = Path(path)
        where = str(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            raw = _load_yaml(path.read_text(encoding="utf-8")) or {}
        except UnicodeDecodeError as e:
            line = path.read_bytes()[:e.start].count(b"\n") + 1
            raise ConfigError(f"{path} line {line}: not UTF-8 text (byte 0x{e.object[e.start]:02x}); save the file "
                              "as UTF-8") from None
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            line = f" line {mark.line + 1}" if mark else ""
            raise ConfigError(f"{path}{line}: not valid YAML: {getattr(e, 'problem', e)}") from None
        except ValueError as e:  # an integer longer than Python converts (4300 digits)
            raise ConfigError(f"{path}: not a config: {str(e).splitlines()[0]}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: top level must be a mapping of sections")
    _check_keys(raw, where)
    for item in overrides or []:
        parts, value = _parse_override(item)
        section, key = parts[:2]
        raw.setdefault(section, {})
        if len(parts) == 3:  # a field of a nested section (train.spike.enabled): merged into what is there
            nested = raw[section].get(key)
            value = {**(nested if isinstance(nested, dict) else {}), parts[2]: value}
        _check_keys({section: {key: value}}, f"--set {item}")
        raw[section][key] = value
    try:
        return Config.model_validate(raw)
    except ValidationError as e:
        raise _one_line(e, where) from None
