"""Full, reference-named weights from any checkpoint, one tensor at a time, without the training world.

Two kinds of checkpoint hold a model:
- a training checkpoint `step_<N>/` (DeepSpeed's files, any tp/pp/dp/ZeRO layout), read offline by
  `pretrain.checkpoint.reader.CheckpointReader` (fp32 master weights);
- an imported checkpoint (`pretrain import-hf`): the same meta/manifest/tokenizer files, and the weights as
  reference-named safetensors under `weights/`.
Both answer the same three questions (`WeightSource`): what run made them (`run`, the ResolvedRun with the model
shape and the tokenizer), which tensors there are (`names`), and one full tensor by name (`tensor`). Export,
generate and `model.init_from` read through this interface only, so each works from either kind. The imported
format's meta.json and manifest are written in one place too (`record_imported`: `import-hf` and `average`).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
from pathlib import Path
from typing import Any, Iterator, Protocol

import torch

from data_pipeline.tokenizer import load_tokenizer
from pretrain import checkpoint
from pretrain.checkpoint import files as checkpoint_files
from pretrain.checkpoint.safetensors_dir import SafetensorsDir
from pretrain.config import Config, ConfigError
from pretrain.model.args import ModelArgs
from pretrain.run.layout import Layout
from pretrain.run.paths import IMPORTED_WEIGHTS
from pretrain.run.resolved import ResolvedRun, TokenizerFacts



class WeightSource(Protocol):
    run: ResolvedRun

    def names(self) -> list[str]: ...
    def tensor(self, name: str) -> torch.Tensor: ...


class ImportedWeights:
    """An imported checkpoint's weights, stored in the dtype they came in (so export reproduces them exactly).
    Every file the safetensors index names must lie in `weights/` (verify checked there is no symlink), and any
    fault reading one is a CheckpointError naming it."""

    def __init__(self, step_dir: str | Path):
        self.step_dir = Path(step_dir)
        self.run = checkpoint.run_of(self.step_dir)
        folder = self.step_dir / IMPORTED_WEIGHTS
        with _reading(folder):
            self._files = SafetensorsDir(folder)
        for path in self._files.files.values():
            if path.parent != folder or path.name in ("", ".", ".."):
                raise checkpoint.CheckpointError(f"{folder}: its safetensors index names {path}, which is not a file "
                                                 f"in {folder}; refusing to open it")

    def names(self) -> list[str]:
        return self._files.names()

    def tensor(self, name: str) -> torch.Tensor:
        where = self._files.files.get(name, self.step_dir / IMPORTED_WEIGHTS)
        with _reading(where):
            return self._files.tensor(name)


@contextlib.contextmanager
def _reading(where: Path) -> Iterator[None]:
    """A truncated or foreign safetensors file (or index) is a CheckpointError naming it."""
    from safetensors import SafetensorError

    try:
        yield
    except checkpoint.CheckpointError:
        raise
    except (SafetensorError, OSError, ValueError, RuntimeError, TypeError) as e:
        if checkpoint_files.host_failure(e):
            raise
        raise checkpoint.CheckpointError(f"{where}: cannot be read ({type(e).__name__}: "
                                         f"{(str(e).strip().splitlines() or [''])[0][:160]})") from None


def open_weights(path: str | Path) -> tuple[Path, WeightSource]:
    """A run dir (-> its `latest`), a `step_<N>` dir or an imported checkpoint, verified -> (its dir, weights)."""
    step_dir = checkpoint.resolve_checkpoint_arg(path)
    if (step_dir / IMPORTED_WEIGHTS).is_dir():
        return step_dir, ImportedWeights(step_dir)
    from pretrain.checkpoint.reader import CheckpointReader

    return step_dir, CheckpointReader(step_dir, verified=True)  # resolve_checkpoint_arg hashed it


def named_tensors(source: WeightSource):
    """(name, full tensor) in model order, one at a time."""
    for name in source.names():
        yield name, source.tensor(name)


# Fields of the model shape that decide what the weights mean (vocab and context length are handled apart:
# the vocabulary is re-padded for the new layout, and RoPE's table for a position does not depend on max_seq_len).
SHAPE_FIELDS = ("dim", "n_layers", "n_heads", "kv_heads", "hidden_dim", "norm_eps", "rope_theta", "qk_norm",
                 "tie_embeddings")
_CONFIG_KEY = {"kv_heads": "n_kv_heads", "hidden_dim": "ffn_hidden_dim"}


def shape_differences(a: Any, b: Any) -> list[str]:
    """The SHAPE_FIELDS in which two ModelArgs differ: non-empty means the weights of one do not fit the other."""
    return [f for f in SHAPE_FIELDS if getattr(a, f) != getattr(b, f)]


def init_source(cfg: Config, run: ResolvedRun) -> WeightSource:
    """`model.init_from`, checked against the run about to train: same model shape (one line listing every
    difference and the --set that fixes it) and shards made with the same tokenizer, unless
    `model.init_from_any_tokenizer` says the embedding rows may change meaning."""
    path = cfg.model.init_from
    try:
        step_dir, source = open_weights(path)
    except (checkpoint.CheckpointError, FileNotFoundError, ValueError) as e:
        raise ConfigError(f"model.init_from={path}: {e}") from None
    theirs, ours = source.run.model, run.model
    if fields := shape_differences(ours, theirs):
        diff = [f"{_CONFIG_KEY.get(f, f)} {getattr(ours, f)} (config) vs {getattr(theirs, f)} (checkpoint)"
                for f in fields]
        fix = " ".join(f"--set model.{_CONFIG_KEY.get(f, f)}={getattr(theirs, f)}" for f in fields)
        raise ConfigError(f"model.init_from={step_dir}: model shape differs: {'; '.join(diff)}; fix: {fix}")
    want, have = source.run.tokenizer, run.tokenizer
    if (want and have and want.identity != have.identity and not cfg.model.init_from_any_tokenizer):
        raise ConfigError(f"model.init_from={step_dir}: the shards at data.path were made with another tokenizer "
                          f"({have.identity[:12]}) than the checkpoint's ({want.identity[:12]}); re-make them with "
                          f"{step_dir / checkpoint.TOKENIZER_DIR}, or set model.init_from_any_tokenizer=true")
    return source


def checkpoint_tokenizer(step_dir: Path, run: ResolvedRun, override: str | None = None) -> tuple[str, Any]:
    """(path, loaded tokenizer) to use with a checkpoint: --tokenizer, else the checkpoint's copy, else the path
    training recorded; the same tokenizer the model was trained with (identity hash) or a one-line error."""

    copied = step_dir / checkpoint.TOKENIZER_DIR
    recorded = run.tokenizer.path if run.tokenizer else ""
    path = override or (str(copied) if copied.exists() else recorded if recorded and Path(recorded).exists()
                        else None)
    if path is None:
        raise checkpoint.CheckpointError(f"{step_dir} holds no tokenizer (and {recorded or 'no path'} recorded at "
                                         "training is gone); pass --tokenizer PATH")
    tok = load_tokenizer(path)
    if run.tokenizer is not None and tok.identity != run.tokenizer.identity:
        raise checkpoint.CheckpointError(f"tokenizer {path} is not the one {step_dir} was trained with (identity "
                                         f"{tok.identity[:12]} vs {run.tokenizer.identity[:12]})")
    return path, tok


def record_imported(tmp: Path, model: ModelArgs, tokenizer: TokenizerFacts | None, seq_len: int, dtype: str,
                    extra: dict[str, Any]) -> None:
    """meta.json and manifest.json of a checkpoint in the imported format (`weights/` and the tokenizer's copy
    already in `tmp`), as `pretrain import-hf` and `pretrain average` write it: step 0, a one-rank layout with the
    model's own vocabulary, ZeRO-0, and the same integrity record a training step has."""
    layout = Layout(world=1, tp=1, pp=1, dp=1, micro_batch_size=1, grad_accum=1, padded_vocab_size=model.vocab_size)
    run = ResolvedRun(layout=layout, model=model, tokenizer=tokenizer, train_data=None, val_data=None,
                      seq_len=seq_len, dtype=dtype, zero_stage=0)
    meta = checkpoint.Meta(step=0, tokenizer=dataclasses.asdict(tokenizer) if tokenizer else {},
                           layout=dataclasses.asdict(layout), resolved=run.to_dict(), extra=extra)
    (tmp / checkpoint.META).write_text(json.dumps(meta.__dict__, indent=1) + "\n")
    checkpoint.write_manifest(tmp, meta, world_size=1)
