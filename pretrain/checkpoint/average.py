"""`pretrain average`: the element-wise mean of several checkpoints' weights, written as a checkpoint.

    pretrain average --checkpoints runs/a/step_800 runs/a/step_900 runs/a --out avg/
    # then: pretrain generate / export-hf / eval --checkpoint avg/, or --set model.init_from=avg/

Why: the mean of checkpoints taken along one run (late in training, or across the end of a cosine decay) or of
runs fine-tuned from one start often evaluates better than any one of them (LAWA, Kaddour 2022; model soups,
Wortsman et al. 2022), and costs no training.

Each checkpoint is read with the offline reader (`weights.open_weights`: any tp/pp/dp/ZeRO layout, dtype, or an
import), one tensor name at a time: memory holds that tensor of every checkpoint plus one output shard, never a
whole model. The mean is taken in fp32 as `torch.stack(tensors).mean(0)`, and written in the format of
`pretrain import-hf` (reference-named safetensors under `weights/`, meta.json, the tokenizer's copy, manifest.json;
pretrain/hf/importer.py), so every tool that reads an import reads it unchanged. meta.json's `extra.averaged` lists
the checkpoints (path and step).

Refused in one line: fewer than two checkpoints, a non-empty output, model shapes that differ (the fields
`weights.shape_differences` compares), another tokenizer (identity hash), other tensor names.

The vocabulary matrices (`tok_embeddings.weight`, `output.weight`) are padded to a multiple of 128 x tp, so the
same model has 384 rows at tp 1 and 512 at tp 2 (384-token tokenizer). Only the tokenizer's rows mean anything:
those are averaged, and the padding rows (never inputs, never targets) are the first checkpoint's, so the output
has the first checkpoint's padded vocabulary. Training from it re-pads for its own layout (`model.init_from`).
"""
from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from typing import Iterator, Sequence

import torch

from data_pipeline.tokenizer import tokenizer_files
from pretrain import checkpoint
from pretrain.checkpoint.safetensors_dir import DEFAULT_SHARD_BYTES, write_sharded
from pretrain.checkpoint.weights import (WeightSource, checkpoint_tokenizer, open_weights, record_imported,
                                         shape_differences)
from pretrain.model.init import VOCAB_ROWS
from pretrain.output_dir import refuse_non_empty, written_whole
from pretrain.run.paths import IMPORTED_WEIGHTS


@dataclasses.dataclass(frozen=True)
class Source:
    step_dir: Path
    step: int
    weights: WeightSource


def _open(paths: Sequence[str | Path]) -> list[Source]:
    """Each checkpoint verified and opened (a run dir means its `latest`)."""
    sources = []
    for path in paths:
        step_dir, weights = open_weights(path)
        sources.append(Source(step_dir, checkpoint.read_meta(step_dir).step, weights))
    return sources


def _check_alike(sources: list[Source]) -> None:
    """One model: same shape, same tokenizer, same tensor names; else a CheckpointError naming the difference."""
    first = sources[0]
    ref, ref_tok, ref_names = first.weights.run, first.weights.run.tokenizer, set(first.weights.names())
    for other in sources[1:]:
        run = other.weights.run
        if fields := shape_differences(ref.model, run.model):
            diff = "; ".join(f"{f} {getattr(ref.model, f)} vs {getattr(run.model, f)}" for f in fields)
            raise checkpoint.CheckpointError(f"cannot average {first.step_dir} and {other.step_dir}: the model "
                                             f"shapes differ ({diff})")
        theirs = run.tokenizer.identity if run.tokenizer else None
        ours = ref_tok.identity if ref_tok else None
        if theirs != ours:
            raise checkpoint.CheckpointError(f"cannot average {first.step_dir} and {other.step_dir}: they were "
                                             f"trained with other tokenizers (identity {str(ours)[:12]} vs "
                                             f"{str(theirs)[:12]}), so the same row means another token")
        if run.vocab_size != ref.vocab_size:
            raise checkpoint.CheckpointError(f"cannot average {first.step_dir} and {other.step_dir}: their "
                                             f"vocabularies differ ({ref.vocab_size} vs {run.vocab_size} tokens)")
        names = set(other.weights.names())
        if names != ref_names:
            odd = sorted(names ^ ref_names)
            raise checkpoint.CheckpointError(f"cannot average {first.step_dir} and {other.step_dir}: tensor "
                                             f"{odd[0]!r} is in one and not the other")


def mean_of(name: str, tensors: list[torch.Tensor], vocab: int) -> torch.Tensor:
    """The fp32 mean of one tensor of every checkpoint; a vocabulary matrix's first `vocab` rows averaged and the
    rest (padding) taken from the first tensor."""
    tensors = [t.float() for t in tensors]
    if name in VOCAB_ROWS:
        if any(t.shape[1:] != tensors[0].shape[1:] or t.shape[0] < vocab for t in tensors):
            raise checkpoint.CheckpointError(f"cannot average {name}: shapes {[tuple(t.shape) for t in tensors]} "
                                             f"do not all hold the tokenizer's {vocab} rows")
        mean = torch.stack([t[:vocab] for t in tensors]).mean(0)
        return torch.cat([mean, tensors[0][vocab:]]) if tensors[0].shape[0] > vocab else mean
    if any(t.shape != tensors[0].shape for t in tensors):
        raise checkpoint.CheckpointError(f"cannot average {name}: shapes {[tuple(t.shape) for t in tensors]} differ")
    return torch.stack(tensors).mean(0)


def _averaged(sources: list[Source], vocab: int) -> Iterator[tuple[str, torch.Tensor]]:
    for name in sources[0].weights.names():
        yield name, mean_of(name, [s.weights.tensor(name) for s in sources], vocab)


def average(paths: Sequence[str | Path], out_dir: str | Path, *,
            max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> tuple[Path, list[Source]]:
    """Write the mean of the checkpoints at `paths` to `out_dir` (new or empty); (out_dir, the checkpoints).
    Raises CheckpointError (one line) for what cannot be averaged, FileExistsError for a non-empty `out_dir`."""
    out_dir = Path(out_dir)
    if len(paths) < 2:
        raise checkpoint.CheckpointError(f"averaging needs at least 2 checkpoints, {len(paths)} given")
    refuse_non_empty(out_dir)  # before reading anything
    sources = _open(paths)
    _check_alike(sources)
    first = sources[0].weights.run
    tok_path, _ = checkpoint_tokenizer(sources[0].step_dir, first) if first.tokenizer else (None, None)

    with written_whole(out_dir) as tmp:
        (tmp / IMPORTED_WEIGHTS).mkdir()
        write_sharded(_averaged(sources, first.vocab_size), tmp / IMPORTED_WEIGHTS, max_shard_bytes)
        tokenizer = None
        if first.tokenizer is not None:
            (tmp / checkpoint.TOKENIZER_DIR).mkdir()
            for f in tokenizer_files(tok_path):
                shutil.copy2(f, tmp / checkpoint.TOKENIZER_DIR / Path(f).name)
            # The copy's final place, so the resolved run names a path that exists after the rename.
            tokenizer = dataclasses.replace(first.tokenizer, path=str((out_dir / checkpoint.TOKENIZER_DIR).resolve()))
        dtypes = {s.weights.run.dtype for s in sources}
        record_imported(tmp, first.model, tokenizer, first.seq_len, dtypes.pop() if len(dtypes) == 1 else "fp32",
                        {"averaged": [{"path": str(s.step_dir.resolve()), "step": s.step} for s in sources]})
    return out_dir, sources
