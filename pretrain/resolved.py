"""The resolved run: every fact derived from config + world size + shard manifests, computed once.

Why one object: the layout, the padded vocabulary, the model shape (max_seq_len stretched to train.seq_len), the
tokenizer's identity and where it lives, and the facts of the training/validation data used to be re-derived in
config, engine, train, describe, the CLI's generate/export and the launcher's preflight, and the copies disagreed.
`resolve_run` derives them once, before any process group exists (it imports no torch), everything downstream
reads the result, and every checkpoint stores it (`meta.json` -> "resolved") so offline tools (generate, export,
convert, plan) read the trained shape back instead of guessing it from a config.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pretrain.config import Config, ConfigError, Layout, resolve_layout
from pretrain.model.args import ModelArgs


@dataclass(frozen=True)
class TokenizerFacts:
    """The tokenizer the shards were made with (from their manifest); `path` absolute, '' when unknown."""
    identity: str
    kind: str
    vocab_size: int
    eos_id: int
    bos_id: int | None = None
    pad_id: int | None = None
    path: str = ""


@dataclass(frozen=True)
class DataFacts:
    """One data source list (train or validation) as the manifests describe it."""
    sources: tuple[str, ...]   # as given, local paths made absolute
    samples: int
    tokens: int
    fingerprint: str           # manifest fingerprints of every source, in order
    tokenizer_identity: str


@dataclass(frozen=True)
class ResolvedRun:
    layout: Layout
    model: ModelArgs                   # vocab_size is the padded vocabulary the embedding really has
    tokenizer: TokenizerFacts | None   # None only when planning without data
    train_data: DataFacts | None
    val_data: DataFacts | None
    seq_len: int
    dtype: str
    zero_stage: int

    @property
    def vocab_size(self) -> int:
        """The tokenizer's vocabulary (token ids that can occur); the model's rows beyond it are padding."""
        return self.tokenizer.vocab_size if self.tokenizer else int(self.model.vocab_size or 0)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ResolvedRun":
        def facts(x: dict | None) -> DataFacts | None:
            return None if x is None else DataFacts(**{**x, "sources": tuple(x["sources"])})
        return cls(layout=Layout(**d["layout"]), model=ModelArgs(**d["model"]),
                   tokenizer=TokenizerFacts(**d["tokenizer"]) if d.get("tokenizer") else None,
                   train_data=facts(d.get("train_data")), val_data=facts(d.get("val_data")),
                   seq_len=d["seq_len"], dtype=d["dtype"], zero_stage=d["zero_stage"])

    @classmethod
    def of_checkpoint(cls, step_dir: str | Path) -> "ResolvedRun":
        """The run a committed checkpoint was written by (its meta.json); one-line error if it has none."""
        from pretrain.checkpoint import CheckpointError, read_meta

        meta = read_meta(step_dir)
        if not meta.resolved:
            raise CheckpointError(f"{step_dir}/meta.json has no resolved run (written by an older version); "
                                  "re-save it with this version")
        return cls.from_dict(meta.resolved)


def _sources(path: str | list[str]) -> list[str]:
    return [path] if isinstance(path, str) else list(path)


def _absolute(spec: str) -> str:
    local = not (spec.startswith("pipe:") or "://" in spec)
    return os.path.abspath(spec) if local else spec


def data_facts(path: str | list[str]) -> tuple[DataFacts, Any]:
    """Facts of a source list, and the first source's manifest; all sources must share one tokenizer."""
    from data_pipeline.errors import DataError
    from data_pipeline.shardset import resolve

    sets = [resolve(s) for s in _sources(path)]
    tok = sets[0].manifest.tokenizer
    for other in sets[1:]:
        if other.manifest.tokenizer.identity != tok.identity:
            raise DataError(f"{other.spec}: made with another tokenizer than {sets[0].spec} "
                            f"({other.manifest.tokenizer.identity[:12]} vs {tok.identity[:12]})")
    facts = DataFacts(sources=tuple(_absolute(s.spec) for s in sets), samples=sum(sum(s.samples) for s in sets),
                      tokens=sum(sum(x.tokens for x in s.shards) for s in sets),
                      fingerprint=",".join(s.fingerprint for s in sets), tokenizer_identity=tok.identity)
    return facts, sets[0].manifest


def _tokenizer_facts(info: Any, manifest_dir: str) -> TokenizerFacts:
    """The manifest records where the tokenizer was loaded from, possibly relative to the directory `prepare` ran
    in; an absolute path that exists is kept, a relative one is tried against the shards' directory."""
    path = info.path or ""
    if path and not os.path.isabs(path):
        beside = os.path.join(manifest_dir, path)
        path = os.path.abspath(path) if os.path.exists(path) else os.path.abspath(beside)
    return TokenizerFacts(identity=info.identity, kind=info.kind, vocab_size=info.vocab_size, eos_id=info.eos_id,
                          bos_id=info.bos_id, pad_id=info.pad_id, path=path)


def resolve_run(cfg: Config, world_size: int) -> ResolvedRun:
    """Config + world + manifests -> the run. Raises ConfigError / DataError with one line."""
    train_data, manifest = data_facts(cfg.data.path) if cfg.data.path else (None, None)
    if manifest is None and cfg.model.vocab_size is None:
        raise ConfigError("data.path is empty: point it at a shard directory made by `pretrain-data prepare` "
                          "(or set model.vocab_size to plan without data)")
    tokenizer, info = None, manifest.tokenizer if manifest else None
    if info is not None:
        tokenizer = _tokenizer_facts(info, manifest.directory)
        if cfg.model.vocab_size is not None and cfg.model.vocab_size < info.vocab_size:
            raise ConfigError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's "
                              f"{info.vocab_size} recorded in the shard manifest ({cfg.data.path}); remove it or "
                              f"make it >= {info.vocab_size}")
    vocab = cfg.model.vocab_size or info.vocab_size
    layout = resolve_layout(cfg, world_size, vocab)
    args = cfg.model.args(vocab)
    model = args.replace(vocab_size=layout.padded_vocab_size, max_seq_len=max(args.max_seq_len, cfg.train.seq_len))
    val_data = data_facts(cfg.data.val_path)[0] if cfg.data.val_path else None
    return ResolvedRun(layout=layout, model=model, tokenizer=tokenizer, train_data=train_data, val_data=val_data,
                       seq_len=cfg.train.seq_len, dtype=cfg.train.dtype, zero_stage=cfg.parallel.zero_stage)
