"""`pretrain`: train (or --dry-run a config), and generate text from a checkpoint.

    pretrain train --config configs/debug.yaml [--set train.max_steps=20 ...] [--dry-run [--world-size N]]
    python -m launch --nproc-per-node 2 -- -m pretrain train --config configs/debug.yaml
    pretrain plan --config configs/7b.yaml --nodes 4 --gpus-per-node 8 [--set model.vocab_size=128256]
    pretrain generate --checkpoint runs/demo/run --prompt "Once upon a time" [--max-new-tokens 64]
    pretrain export-hf --checkpoint runs/demo/run --out hf/ [--dtype fp32] [--max-shard-size 5GB]
    pretrain import-hf --model hf/ --out ckpt/     # then train with --set model.init_from=ckpt/
    pretrain convert-checkpoint --checkpoint runs/demo/run/step_300 --to universal --out ucp/
    pretrain average --checkpoints runs/demo/run/step_200 runs/demo/run --out avg/   # the weights' mean
    pretrain eval --checkpoint runs/demo/run --tasks hellaswag --limit 100 [--tp 2 --pp 2 under python -m launch]

Errors a user can fix (config, data, checkpoint) print one line and exit 2; see pretrain/run/exits.py for the
other exit codes (42 = stopped by a signal after checkpointing: requeue).
"""
from __future__ import annotations

import argparse
import functools
import os
import sys
from pathlib import Path
from typing import Any

from data_pipeline.errors import DataError  # LoaderStateError, TokenizerError, ... are DataErrors
from pretrain import console
from pretrain.config import ConfigError, load_config
from pretrain.libraries import lighten_imports
from pretrain.model.args import PUBLISHED_VOCAB
from pretrain.output_dir import nearest_existing
from pretrain.plan.describe import describe, estimate, fits, rank_layouts, ranking_lines, throughput
from pretrain.plan.fit import check_memory
from pretrain.plan.hardware import Links, gpu_memory_gib, known_gpus, peak_tflops_for
from pretrain.run.exits import EXIT_BAD_INPUT
from pretrain.run.resolved import held_out_note, resolve_run
from pretrain.telemetry.tracking import check_uri, tracking_uri
from pretrain.train.signals import StopRequest


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive whole number")
    return value


@functools.cache  # built once per process: a parser is reusable, and tests call main() thousands of times
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pretrain", description="Distributed LLaMA pretraining (DeepSpeed ZeRO/PP x "
                                "megatron-core TP) with exact-resume checkpoints and MLflow tracking.",
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n")[1])
    sub = p.add_subparsers(dest="command", required=True)
    _train_args(sub)
    _plan_args(sub)
    _generate_args(sub)
    _export_hf_args(sub)
    _import_hf_args(sub)
    _convert_args(sub)
    _average_args(sub)
    _eval_args(sub)
    return p


def _train_args(sub: Any) -> None:
    p = sub.add_parser("train", help="train from a YAML config (one process, or one per rank under torchrun)",
                       description="Train. Under torchrun every rank runs this same command. Resumes from "
                       "<checkpoint.dir>/latest unless checkpoint.resume=none. Exit 0 done, 42 stopped by "
                       "Ctrl-C/SIGTERM/SIGUSR1 after a checkpoint (requeue; a second Ctrl-C exits 130 at once), 3 "
                       "needs a person (too many non-finite steps, or a loss spike train.spike may not roll back), "
                       "4 another rank died or hung, 5 a checkpoint could not be written, 43 no step for "
                       "train.hang_timeout_s (every rank's stacks in <checkpoint.dir>/hangs/; requeue), 2 bad input.")
    p.add_argument("--config", required=True, help="YAML file, e.g. configs/debug.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one config value (repeatable), e.g. --set train.max_steps=20")
    p.add_argument("--dry-run", action="store_true",
                   help="validate config + parallel layout, print layout, parameter count and a per-rank memory "
                        "estimate, build nothing, exit 0")
    p.add_argument("--verbose", action="store_true",
                   help="also show the libraries' start-up logging and warnings (DeepSpeed, MLflow, torch, "
                        "megatron-core), hidden by default")
    p.add_argument("--world-size", type=int, default=None,
                   help="--dry-run only: ranks to plan for (default $WORLD_SIZE or 1)")


def _plan_args(sub: Any) -> None:
    p = sub.add_parser("plan", help="layout + memory estimate for a cluster shape (no GPU needed)",
                        description="The --dry-run of `train` for a world of nodes x gpus-per-node ranks, with "
                        "a fit verdict for --gpu and every fitting layout ranked by predicted step time.")
    p.add_argument("--config", required=True)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--gpu", default="H100", help="GPU model for the peak TFLOP/s and memory (a name in "
                    "pretrain/plan/hardware.py's table, e.g. H100, H200, A100) (default: H100)")
    p.add_argument("--mfu", type=float, default=0.4,
                    help="model FLOPs utilisation to assume, 0-1 (default 0.4; measure it with benchmarks/mfu.py)")
    p.add_argument("--efficiency", type=float, default=0.6,
                    help="layout ranking: fraction of the GPU's peak its matmuls sustain while computing (default "
                    "0.6); recompute, the pipeline bubble and communication come on top")
    p.add_argument("--nvlink-gbs", type=float, default=450.0, help="GB/s per GPU inside a node (default 450)")
    p.add_argument("--ib-gbs", type=float, default=50.0, help="GB/s per GPU between nodes (default 50: 400 Gb/s)")
    p.add_argument("--top", type=int, default=10, help="layouts listed in the ranking (default 10)")


def _generate_args(sub: Any) -> None:
    p = sub.add_parser("generate", help="sample text from a checkpoint with the KV-cache reference model",
                       description="Generate from any committed checkpoint (a step_<N>, a run's latest, or an "
                       "imported one) in one process: no DeepSpeed world, the fp32 master weights read tensor by "
                       "tensor. The prompt is preceded by eos (documents were packed as ...<eos>doc<eos>...).")
    p.add_argument("--checkpoint", required=True, help="a run dir (uses its `latest`), a step_<N> dir, or an "
                   "import-hf output")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=_positive_int, default=64,
                   help="tokens to generate (default 64; fewer if the model's context ends first)")
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=("bf16", "fp32"), default=None,
                   help="compute dtype (default: the training dtype, as the exported model's)")
    p.add_argument("--tokenizer", default=None, help="tokenizer file/dir to use instead of the checkpoint's copy "
                   "(must be the same tokenizer: identity hash checked)")


def _export_hf_args(sub: Any) -> None:
    p = sub.add_parser("export-hf", help="write a Hugging Face LlamaForCausalLM directory (safetensors; "
                       "Qwen3ForCausalLM for a model.qk_norm model)",
                       description="Export any committed checkpoint for transformers, streamed tensor by tensor "
                       "(memory: about one tensor plus one output shard). Writes config.json, "
                       "generation_config.json, model.safetensors or model-0000i-of-0000n.safetensors + "
                       "model.safetensors.index.json, and the tokenizer.")
    p.add_argument("--checkpoint", required=True, help="a run dir (uses its `latest`), a step_<N> dir, or an "
                   "import-hf output")
    p.add_argument("--out", required=True, help="new (or empty) output directory")
    p.add_argument("--dtype", choices=("bf16", "fp32"), default=None,
                   help="weights dtype (default: the training dtype; cast from the fp32 master weights)")
    p.add_argument("--max-shard-size", default="5GB", help="largest safetensors file, e.g. 5GB, 500MB (default 5GB)")
    p.add_argument("--tokenizer", default=None, help="tokenizer file/dir to export when the checkpoint has none "
                   "(must be the training tokenizer: identity hash checked)")
    p.add_argument("--register", default=None, metavar="NAME",
                   help="also log the export to the MLflow run that trained the checkpoint and register it as a new "
                   "version of model NAME in that store's model registry (tags: step, tokens seen, val loss)")


def _import_hf_args(sub: Any) -> None:
    p = sub.add_parser("import-hf", help="turn a transformers LlamaForCausalLM or Qwen3ForCausalLM directory into "
                       "a checkpoint to start training from (model.init_from)",
                       description="Read config.json, (sharded) safetensors and the tokenizer of a "
                       "LlamaForCausalLM or Qwen3ForCausalLM (model.qk_norm) directory; write a checkpoint for "
                       "`--set model.init_from=OUT`.")
    p.add_argument("--model", required=True, help="directory written by transformers' save_pretrained")
    p.add_argument("--out", required=True, help="new (or empty) output directory")
    p.add_argument("--tokenizer", default=None, help="tokenizer file/dir, when the model directory has none")
    p.add_argument("--max-shard-size", default="5GB", help="largest safetensors file (default 5GB)")


def _convert_args(sub: Any) -> None:
    p = sub.add_parser("convert-checkpoint", help="write a checkpoint of any layout in another format "
                       "(DeepSpeed universal)",
                       description="Read a committed step_<N> (any tp/pp/dp, ZeRO stage, dtype) parameter by "
                       "parameter and write DeepSpeed's universal checkpoint: zero/<name>/{fp32,exp_avg,"
                       "exp_avg_sq,step}.pt with whole fp32 tensors under the reference names, plus universal.json. "
                       "Not needed to resume on another layout: `pretrain train` re-slices a checkpoint of another "
                       "layout by itself.")
    p.add_argument("--checkpoint", required=True, help="a run dir (uses its `latest`) or a step_<N> dir")
    p.add_argument("--to", required=True, choices=("universal",), help="output format")
    p.add_argument("--out", required=True, help="new (or empty) output directory")


def _average_args(sub: Any) -> None:
    p = sub.add_parser("average", help="the element-wise mean of several checkpoints' weights, as a checkpoint",
                       description="Average the weights of 2 or more committed checkpoints of one model (any "
                       "layouts: tp/pp/dp/ZeRO, dtype, or import-hf outputs), read tensor by tensor and averaged in "
                       "fp32. Writes a checkpoint in import-hf's format that generate, export-hf, eval and "
                       "--set model.init_from=OUT read; its meta.json lists the checkpoints averaged. Refused when "
                       "the model shapes or tokenizers differ. The vocabulary's padding rows (a multiple of 128 x "
                       "tp) may differ between layouts: the tokenizer's rows are averaged, the padding is the "
                       "first checkpoint's.")
    p.add_argument("--checkpoints", required=True, nargs="+", metavar="CHECKPOINT",
                   help="2 or more: run dirs (each uses its `latest`), step_<N> dirs, or import-hf outputs")
    p.add_argument("--out", required=True, help="new (or empty) output directory")
    p.add_argument("--max-shard-size", default="5GB", help="largest safetensors file (default 5GB)")


def _eval_args(sub: Any) -> None:
    p = sub.add_parser("eval", help="downstream scores of a checkpoint with lm-evaluation-harness, on any layout",
                       description="Evaluate any committed checkpoint (a run's latest, a step_<N>, an import-hf "
                       "output) with lm-evaluation-harness (pip install 'llama-pretrain[eval]'). Every option not "
                       "listed here is lm-eval's own and means what it means to `lm-eval run` (--tasks, "
                       "--include_path, --num_fewshot, --limit, --batch_size, --log_samples, --output_path, ...). "
                       "Under `python -m launch` with --tp/--pp the checkpoint is re-sliced onto that layout and "
                       "the requests are shared by the data-parallel replicas. Scores go to <run>/evals/step_<N>.json "
                       "(lm-eval's own output to <run>/evals/lm_eval/ unless --output_path) and to the MLflow run "
                       "that trained the checkpoint.")
    p.add_argument("--checkpoint", required=True, help="a run dir (uses its `latest`), a step_<N> dir, or an "
                   "import-hf output")
    p.add_argument("--tp", type=_positive_int, default=1, help="tensor-parallel degree to evaluate with (default 1)")
    p.add_argument("--pp", type=_positive_int, default=1, help="pipeline stages to evaluate with (default 1; "
                   "generation tasks need 1)")
    p.add_argument("--dtype", choices=("bf16", "fp32"), default=None, help="compute dtype (default: the training "
                   "dtype)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--tokenizer", default=None, help="tokenizer file/dir when the checkpoint holds none (must be the "
                   "training tokenizer: identity hash checked)")


def run_eval(args: argparse.Namespace, lm_eval_args: list[str]) -> int:
    import torch

    console.quiet(verbose=False, cpu=args.device == "cpu" or (args.device == "auto" and not torch.cuda.is_available()))
    try:
        from pretrain.eval.command import run_eval as evaluate
    except ImportError as e:
        raise ConfigError(f"pretrain eval needs lm-evaluation-harness ({e}): pip install 'llama-pretrain[eval]'") \
            from None
    return evaluate(args.checkpoint, lm_eval_args, tp=args.tp, pp=args.pp, dtype=args.dtype,
                    tokenizer=args.tokenizer, device=args.device)


def run_convert(args: argparse.Namespace) -> int:
    _quiet_offline()
    from pretrain.checkpoint import resolve_checkpoint_arg
    from pretrain.checkpoint.convert import to_universal

    step_dir = resolve_checkpoint_arg(args.checkpoint)
    try:
        out = to_universal(step_dir, args.out)
    except FileExistsError as e:
        raise ConfigError(str(e)) from None
    print(f"converted {step_dir} -> {out} (DeepSpeed universal checkpoint, {args.to})")
    return 0


def run_average(args: argparse.Namespace) -> int:
    """Several checkpoints -> one with the mean of their weights (pretrain/checkpoint/average.py)."""
    _quiet_offline()
    from pretrain.checkpoint.average import average

    max_shard = _max_shard_bytes(args)
    try:
        out, sources = average(args.checkpoints, args.out, max_shard_bytes=max_shard)
    except FileExistsError as e:
        raise ConfigError(str(e)) from None
    print(f"averaged {len(sources)} checkpoints ({', '.join(f'{s.step_dir} (step {s.step})' for s in sources)}) "
          f"-> {out} (use it as --checkpoint {out}, or train from it: --set model.init_from={out})")
    return 0


def _fail(msg: str) -> int:
    console.error(msg)
    return EXIT_BAD_INPUT


PLAN_DEFAULT_VOCAB = 32000


def _assumed_vocab(flavor: str) -> tuple[int, str]:
    """The vocabulary `plan` assumes without data: the flavor's published tokenizer, else 32000; and the reason."""

    if flavor in PUBLISHED_VOCAB:
        vocab, family = PUBLISHED_VOCAB[flavor]
        return vocab, f"the {flavor} flavor's {family} tokenizer"
    return PLAN_DEFAULT_VOCAB, f"the {flavor} flavor names no tokenizer; a LLaMA-2-sized default"


def _check_outputs(cfg) -> None:
    """Where the run will write: checkpoint.dir can be created and written, and the MLflow store answers (a few
    seconds at most). Training itself goes on without MLflow (pretrain/telemetry/tracking.py); a dry run is the place to
    hear about it."""

    folder = Path(cfg.checkpoint.dir).resolve()
    existing = nearest_existing(folder)
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"checkpoint.dir {folder}: {existing} is not a writable directory")
    if cfg.tracking.enabled and (why := check_uri(tracking_uri(cfg))):
        raise ConfigError(f"tracking.uri: {why}; start it, fix the URI, or set tracking.enabled=false")


def _dry_run(cfg, world: int, *, assume_vocab: bool = False, gpu: str | None = None, mfu: float = 0.4,
             ranking: argparse.Namespace | None = None) -> int:
    """Resolve the run exactly as `pretrain train` does at start (the same checks, data included) and describe
    it, building nothing and importing no torch. `assume_vocab` (plan): planning a cluster before any data exists
    is normal, so an unknown vocabulary becomes a stated assumption instead of an error."""

    peak = _peak_tflops(gpu) if gpu is not None else None  # a bad --gpu fails before anything is printed
    assumed, why = _assumed_vocab(cfg.model.flavor) if assume_vocab else (None, "")
    run = resolve_run(cfg, world, require_data=not assume_vocab, vocab_without_data=assumed)
    if not assume_vocab:  # this host's run, as its start checks it: a shape it cannot hold is refused here
        check_memory(cfg, run)
    vocab = cfg.model.vocab_size or (run.tokenizer.vocab_size if run.tokenizer else assumed)  # before padding
    if run.tokenizer is None and cfg.model.vocab_size is None:
        print(f"note: no shards at data.path; assuming a {vocab}-token vocabulary ({why}; "
              "set model.vocab_size=N)")
    print(describe(cfg, world, gpu=gpu, run=run, ranks_per_node=ranking.gpus_per_node if ranking else None))
    for line in _data_lines(run) + [held_out_note(cfg, run) or ""]:
        if line:
            print(line)
    e = estimate(cfg, world, run=run)
    if peak is not None:
        print(throughput(cfg, e, peak, mfu))
    if ranking is not None and gpu is not None:

        ranked = rank_layouts(cfg, ranking.nodes, ranking.gpus_per_node, vocab, gpu, peak, ranking.efficiency,
                              Links(nvlink=ranking.nvlink_gbs, ib=ranking.ib_gbs))
        print("\n".join(ranking_lines(ranked, ranking.top, cfg)))
    if gpu is not None and not fits(e, gpu):
        print(f"dry run: config, layout and data are valid but do not fit {gpu} memory (see above); nothing was "
              "built")
    else:
        print("dry run: config, layout and data are valid; nothing was built")
    return 0


def _data_lines(run) -> list[str]:
    """What the run will read: the resolved data facts and the tokenizer every checkpoint will carry."""
    lines = []
    for key, facts in (("data.path", run.train_data), ("data.val_path", run.val_data)):
        if facts is not None:
            lines.append(f"{key}: {facts.samples:,} documents, {facts.tokens:,} tokens "
                         f"(~{facts.tokens / run.tokens_per_step:,.1f} steps per epoch) in {', '.join(facts.sources)}")
    if run.tokenizer is not None:
        t = run.tokenizer
        lines.append(f"tokenizer: {t.path} ({t.kind}, {t.vocab_size} tokens, identity {t.identity[:12]})")
    return lines


@functools.cache
def _local_gpu() -> str | None:
    """This machine's GPU name for --dry-run's fit verdict, when it is one the tables know; else None.
    Asked of nvidia-smi once per process, not torch: a dry run imports no torch (seconds per call on a login
    node)."""
    import subprocess

    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    names = out.stdout.strip().splitlines() if out.returncode == 0 else []
    name = names[0].strip() if names else ""
    return name if name and peak_tflops_for(name) and gpu_memory_gib(name) else None


def _peak_tflops(gpu: str) -> float:

    peak = peak_tflops_for(gpu)
    if peak is None:
        raise ConfigError(f"--gpu {gpu}: unknown GPU; one of {known_gpus()}")
    return peak


def _quiet_libraries(cfg, verbose: bool) -> None:
    """Library start-up chatter off unless --verbose (pretrain/console.py says what and why)."""
    import torch


    cpu = cfg.train.device == "cpu" or (cfg.train.device == "auto" and not torch.cuda.is_available())
    console.quiet(verbose=verbose, cpu=cpu)


def _dtype(name: str):
    import torch

    return torch.bfloat16 if name == "bf16" else torch.float32


def _quiet_offline() -> None:
    """Reading DeepSpeed's files imports DeepSpeed and megatron-core; on a machine without CUDA their start-up
    notices (accelerator fallback, no Transformer Engine) would land in generate's output."""
    import warnings

    import torch

    warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def _max_shard_bytes(args: argparse.Namespace) -> int:
    """--max-shard-size of export-hf and import-hf in bytes; a bad value is a one-line error naming the flag."""
    from pretrain.checkpoint.safetensors_dir import parse_size

    try:
        return parse_size(args.max_shard_size)
    except ValueError as e:
        raise ConfigError(f"--max-shard-size: {e}") from None


def run_import(args: argparse.Namespace) -> int:
    from pretrain.hf.format import HFFormatError
    from pretrain.hf.importer import import_hf

    max_shard = _max_shard_bytes(args)
    try:
        out = import_hf(args.model, args.out, tokenizer=args.tokenizer, max_shard_bytes=max_shard)
    except (HFFormatError, FileExistsError, ValueError) as e:
        raise ConfigError(str(e)) from None
    print(f"imported {args.model} -> {out} (train from it: --set model.init_from={out})")
    return 0


def run_export(args: argparse.Namespace) -> int:
    """Any committed checkpoint -> Hugging Face LlamaForCausalLM (Qwen3ForCausalLM) directory, tensor by tensor."""
    from pretrain.checkpoint.weights import open_weights
    from pretrain.hf.export import export_checkpoint
    from pretrain.hf.format import architecture
    from pretrain.telemetry import model_registry

    max_shard = _max_shard_bytes(args)
    _quiet_offline()
    step_dir, source = open_weights(args.checkpoint)
    if args.register:  # before exporting: a checkpoint trained without tracking has no run to register under
        model_registry.check(step_dir)
    try:
        out = export_checkpoint(step_dir, source, args.out, tokenizer=args.tokenizer,
                                dtype=_dtype(args.dtype) if args.dtype else None, max_shard_bytes=max_shard)
    except FileExistsError as e:
        raise ConfigError(str(e)) from None
    print(f"exported {step_dir} -> {out} (transformers.{architecture(source.run.model)}.from_pretrained('{out}'))")
    if args.register:
        model, uri = model_registry.register(out, step_dir, args.register)
        print(f"registered {model} in {uri} (back as a directory: MLFLOW_REGISTRY_URI={uri} and "
              f"mlflow.artifacts.download_artifacts('{model}'))")
    return 0


def run_generate(args: argparse.Namespace) -> int:
    """Any committed checkpoint + its tokenizer -> KV-cache sampling in one process.

    The weights are read offline from DeepSpeed's files (or an imported checkpoint) tensor by tensor, so
    generation needs neither DeepSpeed's world nor a consolidated copy; the model shape, context length included,
    is the one training resolved (meta.json), not the flavor's default.
    """
    import torch

    from pretrain.model.generate import Sampling, generate
    from pretrain.model.transformer import Transformer
    from pretrain.checkpoint.weights import checkpoint_tokenizer, open_weights

    _quiet_offline()
    step_dir, source = open_weights(args.checkpoint)
    run = source.run
    _, tok = checkpoint_tokenizer(step_dir, run, args.tokenizer)  # loaded once: its identity was checked on this object
    model = Transformer(run.model)
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(source.tensor(name))
    model.to(_dtype(args.dtype or run.dtype))
    # Documents were packed as ...<eos>doc<eos>...: an eos in front of the prompt reads as "a document starts".
    prompt = [tok.eos_id] + tok.encode_batch([args.prompt])[0]
    context = run.model.max_seq_len
    if len(prompt) >= context:
        raise ConfigError(f"the prompt is {len(prompt)} tokens (with the leading eos), which is longer than the "
                          f"model's context of {context}: nothing is left to generate into")
    new_tokens = min(args.max_new_tokens, context - len(prompt))
    if new_tokens < args.max_new_tokens:
        print(f"note: generating {new_tokens} tokens, not {args.max_new_tokens}: the model's context is {context}",
              file=sys.stderr)
    out = generate(model, prompt, new_tokens,
                   Sampling(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p),
                   eos_id=tok.eos_id, seed=args.seed, vocab_size=run.vocab_size)
    print(args.prompt + tok.decode([t for t in out if t != tok.eos_id]))
    return 0


def main(argv: list[str] | None = None) -> int:
    lighten_imports()  # before DeepSpeed or megatron-core is imported: seconds less start-up (pretrain/libraries.py)
    args, rest = _parser().parse_known_args(argv)
    if rest and args.command != "eval":  # only `eval` passes options on (to lm-eval)
        _parser().error(f"unrecognized arguments: {' '.join(rest)}")
    stop = None
    if args.command == "train" and not args.dry_run:
        # Before torch/DeepSpeed imports (seconds): a preemption signal during start-up must not kill the rank.
        stop = StopRequest().install()

    user_errors: tuple[type[BaseException], ...] = (ConfigError, DataError)
    if args.command != "plan" and not getattr(args, "dry_run", False):  # plan and dry runs import no torch
        from pretrain.checkpoint import CheckpointError
        user_errors += (CheckpointError,)
    try:
        if args.command == "generate":
            return run_generate(args)
        if args.command == "export-hf":
            return run_export(args)
        if args.command == "import-hf":
            return run_import(args)
        if args.command == "convert-checkpoint":
            return run_convert(args)
        if args.command == "average":
            return run_average(args)
        if args.command == "eval":
            return run_eval(args, rest)
        cfg = load_config(args.config, args.overrides)
        if args.command == "plan":
            if not 0 < args.mfu <= 1:
                raise ConfigError(f"--mfu {args.mfu}: a fraction in (0, 1]")
            if not 0 < args.efficiency <= 1:
                raise ConfigError(f"--efficiency {args.efficiency}: a fraction in (0, 1]")
            return _dry_run(cfg, args.nodes * args.gpus_per_node, assume_vocab=True, gpu=args.gpu, mfu=args.mfu,
                            ranking=args)
        if args.dry_run:
            _check_outputs(cfg)
            return _dry_run(cfg, args.world_size or int(os.environ.get("WORLD_SIZE", "1")), gpu=_local_gpu())
        _quiet_libraries(cfg, args.verbose)
        from pretrain.train.loop import train
        code = train(cfg, stop)
        stop.settle()  # finished or checkpointed: a late signal must not turn this exit code into a kill
        return code
    except user_errors as e:
        return _fail(str(e))
