"""Export a model to Hugging Face's LlamaForCausalLM layout (Qwen3ForCausalLM's for a `qk_norm` model):
config.json, sharded safetensors, tokenizer.

Export is a renaming of tensors (see pretrain/hf/format.py), streamed: the weights arrive one (name, tensor) at a
time from any checkpoint (pretrain/checkpoint/weights.py) and go straight into the shard being written, so memory
holds one tensor plus one output shard, never the model.

The (padded) vocabulary is kept whole so exported logits equal ours exactly. Padding rows (ids past the
tokenizer's vocabulary) were never targets; `generation_config.json` lists them in `suppress_tokens`, so
transformers' `generate` never samples them, exactly as `pretrain generate` restricts itself to the tokenizer's
ids. The tokenizer is exported beside the weights so `AutoTokenizer.from_pretrained(out)` works.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Iterable, Iterator, Mapping

import torch

from data_pipeline.tokenizer import load_tokenizer, tokenizer_files
from pretrain.checkpoint.safetensors_dir import DEFAULT_SHARD_BYTES, write_sharded
from pretrain.checkpoint.weights import WeightSource, checkpoint_tokenizer, named_tensors
from pretrain.hf.format import hf_config, hf_name
from pretrain.model.args import ModelArgs
from pretrain.model.init import reference_shapes
from pretrain.output_dir import written_whole

Weights = Iterable[tuple[str, torch.Tensor]] | Mapping[str, torch.Tensor]


def _renamed(weights: Weights, args: ModelArgs, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    """Our names -> HF names, cast to `dtype`, every shape checked against `args`; all expected names present."""
    expected = reference_shapes(args)
    seen: set[str] = set()
    for name, tensor in (weights.items() if isinstance(weights, Mapping) else weights):
        if args.tie_embeddings and name == "output.weight":
            continue  # transformers re-ties lm_head to embed_tokens
        if name not in expected:
            hf_name(name)  # KeyError naming the parameter if it has no HF equivalent at all
            raise KeyError(f"parameter {name!r} is not part of a model with this shape ({args.n_layers} layers)")
        if tuple(tensor.shape) != expected[name]:
            raise ValueError(f"parameter {name!r} has shape {tuple(tensor.shape)}; the model shape says "
                             f"{expected[name]}")
        seen.add(name)
        yield hf_name(name), tensor.detach().to("cpu", dtype)
    missing = sorted(set(expected) - seen)
    if missing:
        raise KeyError(f"no weights for {len(missing)} parameter(s), e.g. {missing[0]!r}")


def export_tokenizer(src: str | Path, dest: Path, *, max_len: int) -> None:
    """Copy the tokenizer files and complete tokenizer_config.json so AutoTokenizer can load `dest`: the class,
    the special tokens by content, and the context length. A sentencepiece model becomes `tokenizer.model`."""

    src = Path(src)
    tok = load_tokenizer(str(src))
    files = [Path(f) for f in tokenizer_files(str(src))]
    for f in files:
        shutil.copy2(f, dest / ("tokenizer.model" if f.suffix == ".model" else f.name))
    cfg_path = dest / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
    if (dest / "tokenizer.json").is_file():
        from tokenizers import Tokenizer

        inner = Tokenizer.from_file(str(dest / "tokenizer.json"))
        cfg.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
        for key, tid in (("bos_token", tok.bos_id), ("eos_token", tok.eos_id), ("pad_token", tok.pad_id)):
            if tid is not None and not cfg.get(key):
                cfg[key] = inner.id_to_token(tid)
    else:  # sentencepiece: transformers' LlamaTokenizer reads tokenizer.model; ours never adds bos/eos itself
        cfg.setdefault("tokenizer_class", "LlamaTokenizer")
        cfg.setdefault("add_bos_token", False)
        cfg.setdefault("add_eos_token", False)
    cfg["model_max_length"] = max_len
    cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")


def export_hf(weights: Weights, args: ModelArgs, out_dir: str | Path, *, tokenizer: str | Path | None,
              vocab_size: int | None = None, bos_token_id: int | None = None, eos_token_id: int | None = None,
              pad_token_id: int | None = None, dtype: torch.dtype = torch.bfloat16,
              max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> Path:
    """Write `out_dir` (refusing a non-empty one) through a temp dir renamed at the end.

    `weights`: (reference name, full tensor) pairs in any order, or a state dict. `args.vocab_size` is the number
    of embedding rows (padded); `vocab_size` the tokenizer's (ids at or past it are suppressed in generation).
    `tokenizer`: a tokenizer file or directory, or None to export weights alone (callers decide; the CLI refuses).
    """
    out_dir = Path(out_dir)
    with written_whole(out_dir) as tmp:
        write_sharded(_renamed(weights, args, dtype), tmp, max_shard_bytes)
        config = hf_config(args, bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
                           dtype=dtype)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        generation = {"bos_token_id": bos_token_id, "eos_token_id": eos_token_id, "pad_token_id": pad_token_id}
        if vocab_size is not None and vocab_size < args.vocab_size:
            generation["suppress_tokens"] = list(range(vocab_size, args.vocab_size))
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        if tokenizer is not None:
            export_tokenizer(tokenizer, tmp, max_len=args.max_seq_len)
    return out_dir


def export_checkpoint(step_dir: Path, source: WeightSource, out_dir: str | Path, *, tokenizer: str | None = None,
                      dtype: torch.dtype | None = None, max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> Path:
    """A committed checkpoint, opened (`pretrain.checkpoint.weights.open_weights`) -> a Hugging Face directory, with
    the tokenizer it was trained with; `dtype` None: the dtype it trained in. `pretrain export-hf` and
    `train.register_as` both call it."""
    run = source.run
    tokenizer_path, _ = checkpoint_tokenizer(step_dir, run, tokenizer)
    tok = run.tokenizer
    out = export_hf(named_tensors(source), run.model, out_dir, tokenizer=tokenizer_path, vocab_size=run.vocab_size,
                    bos_token_id=tok.bos_id if tok else None, eos_token_id=tok.eos_id if tok else None,
                    pad_token_id=tok.pad_id if tok else None,
                    dtype=dtype or (torch.bfloat16 if run.dtype == "bf16" else torch.float32),
                    max_shard_bytes=max_shard_bytes)
    return out
