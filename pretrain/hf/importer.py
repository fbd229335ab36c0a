"""Import a Hugging Face LlamaForCausalLM (or Qwen3ForCausalLM: `model.qk_norm`) directory as a checkpoint
`pretrain train` can start from.

    pretrain import-hf --model hf_dir/ --out ckpt/        # then: --set model.init_from=ckpt/

The output is a committed checkpoint directory like a training step's (meta.json with the resolved run, the
tokenizer copied in, manifest.json with sizes and hashes, written under a temporary name and renamed), except
that its weights are one unsharded copy, reference-named safetensors under `weights/`, in the dtype they came in:
nothing is rounded, so exporting it again reproduces the original tensors bit for bit. The resolved run records
the model shape (read from config.json), the tokenizer (identity hash: training refuses shards made with another)
and the vocabulary as the checkpoint has it (unpadded; training pads it for its own layout).
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Iterator

import torch

from data_pipeline.errors import DataError
from data_pipeline.tokenizer import load_tokenizer, tokenizer_files
from pretrain import checkpoint
from pretrain.checkpoint.safetensors_dir import DEFAULT_SHARD_BYTES, SafetensorsDir, write_sharded
from pretrain.checkpoint.weights import record_imported
from pretrain.hf.format import HFFormatError, model_args, reference_name
from pretrain.model.args import ModelArgs
from pretrain.model.init import reference_shapes
from pretrain.output_dir import refuse_non_empty, written_whole
from pretrain.run.paths import IMPORTED_WEIGHTS
from pretrain.run.resolved import TokenizerFacts

_KEPT = (torch.float32, torch.bfloat16)  # stored as they are; fp16/fp64 become fp32 (exact for fp16)


def _tokenizer(src: Path, dest: Path, model: ModelArgs) -> TokenizerFacts:
    """Copy the tokenizer files into `dest` and describe them (identity hash, special ids) from the copy."""

    try:
        files = [Path(f) for f in tokenizer_files(str(src))]
    except DataError as e:
        raise HFFormatError(f"{e}; pass --tokenizer PATH") from None
    if not files:
        raise HFFormatError(f"{src}: no tokenizer files (tokenizer.json or a sentencepiece .model); pass "
                            "--tokenizer PATH")
    dest.mkdir()
    for f in files:
        shutil.copy2(f, dest / f.name)
    try:
        tok = load_tokenizer(str(dest / files[0].name if src.is_file() else dest))
    except DataError as e:
        raise HFFormatError(f"{src}: {e}") from None
    if tok.vocab_size > model.vocab_size:
        raise HFFormatError(f"{src}: the tokenizer has {tok.vocab_size} tokens but the model only "
                            f"{model.vocab_size} embedding rows")
    return TokenizerFacts(identity=tok.identity, kind=tok.kind, vocab_size=tok.vocab_size, eos_id=tok.eos_id,
                          bos_id=tok.bos_id, pad_id=tok.pad_id, path=os.path.abspath(tok.path))


def _weights(files: SafetensorsDir, args: ModelArgs, where: Path, dtypes: set[torch.dtype]
             ) -> Iterator[tuple[str, torch.Tensor]]:
    """HF tensors -> (reference name, tensor), every shape checked, nothing missing, nothing unknown."""
    expected = reference_shapes(args)
    seen: set[str] = set()
    for hf in files.names():
        name = reference_name(hf)
        if name is None:
            if hf.endswith("rotary_emb.inv_freq"):
                continue  # a buffer older transformers saved; ours is computed from rope_theta
            raise HFFormatError(f"{where}: tensor {hf!r} has no equivalent in our model")
        if name == "output.weight" and args.tie_embeddings:
            continue  # tied: the embedding is the head
        if name not in expected:
            raise HFFormatError(f"{where}: tensor {hf!r} does not fit the config's {args.n_layers} layers")
        t = files.tensor(hf)
        if tuple(t.shape) != expected[name]:
            raise HFFormatError(f"{where}: {hf} has shape {tuple(t.shape)}, config.json implies {expected[name]}")
        if t.dtype not in _KEPT:
            t = t.float()
        dtypes.add(t.dtype)
        seen.add(name)
        yield name, t
    missing = sorted(set(expected) - seen)
    if missing:
        raise HFFormatError(f"{where}: no tensor for {len(missing)} parameter(s), e.g. {missing[0]!r}")


def import_hf(model_dir: str | Path, out_dir: str | Path, *, tokenizer: str | Path | None = None,
              max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> Path:
    """Write the imported checkpoint `out_dir` (refusing a non-empty one). Raises HFFormatError (one line)."""
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    refuse_non_empty(out_dir)  # before reading anything
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise HFFormatError(f"{model_dir}: no config.json (a transformers model directory has one)")
    try:
        config = json.loads(config_path.read_text())
    except ValueError as e:
        raise HFFormatError(f"{config_path}: not valid JSON ({e})") from None
    args = model_args(config, str(config_path))
    try:
        files = SafetensorsDir(model_dir)
    except (FileNotFoundError, ValueError) as e:
        raise HFFormatError(str(e)) from None

    with written_whole(out_dir) as tmp:
        (tmp / IMPORTED_WEIGHTS).mkdir()
        facts = _tokenizer(Path(tokenizer) if tokenizer else model_dir, tmp / checkpoint.TOKENIZER_DIR, args)
        dtypes: set[torch.dtype] = set()
        write_sharded(_weights(files, args, model_dir, dtypes), tmp / IMPORTED_WEIGHTS, max_shard_bytes)
        # The copied tokenizer's final place, so the resolved run names a path that exists after the rename.
        facts = dataclasses.replace(facts, path=str((out_dir / checkpoint.TOKENIZER_DIR).resolve()))
        record_imported(tmp, args, facts, args.max_seq_len, "bf16" if dtypes == {torch.bfloat16} else "fp32",
                        {"imported_from": str(model_dir.resolve()), "hf_config": config})
    return out_dir
