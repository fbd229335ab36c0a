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
import glob
import os
from dataclasses import dataclass
from typing import Any

from data_pipeline.errors import DataError, ShardError, TokenizerError
from data_pipeline.manifest import MANIFEST_NAME
from data_pipeline.plan import check_split
from data_pipeline.shardset import resolve
from data_pipeline.tokenizer import load_tokenizer
from pretrain.config import Config, ConfigError
from pretrain.model.args import ModelArgs
from pretrain.run.layout import Layout, check_layout, resolve_layout


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

    @property
    def params(self) -> int:
        """Parameters of the model as built (padded vocabulary, tied head counted once)."""
        return self.model.num_params()

    @property
    def tokens_per_step(self) -> int:
        return self.layout.global_batch * self.seq_len

    def flat(self) -> dict[str, Any]:
        """Dotted key -> value of what the run really is, for MLflow params: the model's shape as built (where the
        config says None for "the flavor's" or "the tokenizer's"), layout, tokenizer and data facts."""
        out: dict[str, Any] = {f"model.{k}": v for k, v in dataclasses.asdict(self.model).items()}
        out.update({"model.padded_vocab_size": self.model.vocab_size, "model.params": self.params,
                    "model.head_dim": self.model.head_dim, "model.hidden_dim": self.model.hidden_dim,
                    "model.kv_heads": self.model.kv_heads})
        out.update({f"layout.{k}": v for k, v in dataclasses.asdict(self.layout).items()})
        out["layout.global_batch"] = self.layout.global_batch
        out["layout.tokens_per_step"] = self.tokens_per_step
        if self.tokenizer:
            out.update({f"tokenizer.{k}": v for k, v in dataclasses.asdict(self.tokenizer).items()})
        for name, facts in (("data.train", self.train_data), ("data.val", self.val_data)):
            if facts:
                out.update({f"{name}_samples": facts.samples, f"{name}_tokens": facts.tokens,
                            f"{name}_fingerprint": facts.fingerprint})
        return out

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


def layout_words(run: ResolvedRun) -> str:
    """How a run's ranks split, in the words of resume and checkpoint messages: tp 2 x cp 2 x pp 1 x dp 2 ZeRO-1."""
    return f"{run.layout.shape_text} ZeRO-{run.zero_stage}" + (" bf16" if run.dtype == "bf16" else "")


class MissingDataError(ConfigError):
    """data.path names no shards: a training run (and its --dry-run) stops here; planning may go on without data."""


def _sources(path: str | list[str]) -> list[str]:
    return [path] if isinstance(path, str) else list(path)


def _is_local(spec: str) -> bool:
    return not (spec.startswith("pipe:") or "://" in spec)


def _absolute(spec: str) -> str:
    return os.path.abspath(spec) if _is_local(spec) else spec


def _absent(spec: str) -> bool:
    """A plain local path (no glob, no brace pattern, no URL) that is not there."""
    return _is_local(spec) and not glob.has_magic(spec) and "{" not in spec and not os.path.exists(spec)


def _missing(cfg: Config) -> str | None:
    """Why data.path names no shards at all, or None when there is something to read (and check)."""
    if not cfg.data.path:
        return "data.path is empty: point it at a shard directory made by `pretrain-data prepare`"
    for spec in _sources(cfg.data.path):
        if _absent(spec):
            return f"data.path: {spec} does not exist (make shards with `pretrain-data prepare`)"
    return None


def _shard_sets(key: str, path: str | list[str]) -> list[Any]:
    """Every source of `key` resolved to its manifest and shards; a DataError names the config key."""
    for spec in _sources(path):
        if _absent(spec):
            raise ShardError(f"{key}: {spec} does not exist (make shards with `pretrain-data prepare`, with the "
                             "training tokenizer)")
    try:
        return [resolve(s) for s in _sources(path)]
    except DataError as e:
        raise type(e)(f"{key}: {e}") from None


def _facts(sets: list[Any]) -> DataFacts:
    return DataFacts(sources=tuple(_absolute(s.spec) for s in sets), samples=sum(sum(s.samples) for s in sets),
                     tokens=sum(sum(x.tokens for x in s.shards) for s in sets),
                     fingerprint=",".join(s.fingerprint for s in sets),
                     tokenizer_identity=sets[0].manifest.tokenizer.identity)


def _same_tokenizer(key: str, sets: list[Any], identity: str, reference: str) -> None:
    for s in sets:
        other = s.manifest.tokenizer.identity
        if other != identity:
            raise TokenizerError(f"{key}: {s.spec} was made with another tokenizer than {reference} (identity "
                                 f"{other[:12]} vs {identity[:12]}): token ids would mean other words; prepare "
                                 "it with the training tokenizer")


def _splittable(key: str, sets: list[Any], layout: Layout, num_workers: int) -> None:
    """The loader's own rule (data_pipeline.plan.check_split), checked for this layout before anything starts."""
    for s in sets:
        check_split(f"{key}: {s.spec}", sum(s.samples), layout.dp, num_workers)


def _recorded_paths(recorded: str, manifest_dir: str) -> list[str]:
    """Where the tokenizer may be: the manifest records the path `prepare` was given, which older versions kept
    relative to the directory `prepare` ran in; try it as given, then beside the shards and their parent."""
    if not recorded or os.path.isabs(recorded):
        return [recorded] if recorded else []
    return [os.path.abspath(p) for p in (recorded, os.path.join(manifest_dir, recorded),
                                         os.path.join(os.path.dirname(manifest_dir), recorded))]


def _tokenizer_facts(cfg: Config, info: Any, manifest_dir: str) -> TokenizerFacts:
    """The shards' tokenizer with an absolute path to its files, which every checkpoint copies. The files must
    exist and be the tokenizer the manifest names, else a one-line TokenizerError saying how to fix it: a
    checkpoint without its tokenizer cannot be sampled from or exported."""
    where = os.path.join(manifest_dir, MANIFEST_NAME)
    tried = [os.path.abspath(cfg.data.tokenizer)] if cfg.data.tokenizer else _recorded_paths(info.path, manifest_dir)
    path = next((p for p in tried if os.path.exists(p)), "")
    if not path:
        named = (f"data.tokenizer={cfg.data.tokenizer} does not exist" if cfg.data.tokenizer else
                 f"the tokenizer the shards were made with is not at {info.path or '(no path recorded)'} "
                 f"(recorded in {where}" + (f"; tried {', '.join(tried)})" if len(tried) > 1 else ")"))
        raise TokenizerError(f"{named}; every checkpoint carries a copy for generate/export: set "
                             "data.tokenizer=<its directory or tokenizer.json/.model file>")
    found = load_tokenizer(path).identity
    if found != info.identity:
        key = "data.tokenizer" if cfg.data.tokenizer else "the recorded tokenizer"
        raise TokenizerError(f"{key} {path} is not the tokenizer the shards were made with (identity "
                             f"{found[:12]} vs {info.identity[:12]} in {where}); point data.tokenizer at the "
                             "right one")
    return TokenizerFacts(identity=info.identity, kind=info.kind, vocab_size=info.vocab_size, eos_id=info.eos_id,
                          bos_id=info.bos_id, pad_id=info.pad_id, path=path)


def resolve_run(cfg: Config, world_size: int, *, require_data: bool = True,
                vocab_without_data: int | None = None) -> ResolvedRun:
    """Config + world + manifests -> the run, with every check that needs no process group. One-line
    ConfigError / DataError otherwise.

    Training, its `--dry-run` and the launcher's preflight share these checks (so a dry run that passes does not
    fail at start): the layout rules; data.path's shards (one tokenizer, enough documents for every DP rank x
    loader worker); the tokenizer's files (found and the right ones); data.val_path's shards (they exist, made
    with the training tokenizer, enough documents for every DP rank x worker). Whether the run fits this host's
    memory is the planner's question (`pretrain.plan.fit.check_memory`), asked by training and its dry run.

    `require_data=False` (planning): when data.path names nothing, the model's vocabulary is model.vocab_size,
    else `vocab_without_data` (the caller says which and why); data that is there is checked all the same.
    """
    check_layout(cfg, world_size)  # the cheap rules first: they fail before any manifest is read
    missing = _missing(cfg)
    if missing and (require_data or (cfg.model.vocab_size or vocab_without_data) is None):
        raise MissingDataError(missing if require_data else
                               f"{missing}, or set model.vocab_size to plan without data")
    sets = [] if missing else _shard_sets("data.path", cfg.data.path)
    tokenizer, train_data = None, None
    if sets:
        info = sets[0].manifest.tokenizer
        _same_tokenizer("data.path", sets[1:], info.identity, sets[0].spec)
        tokenizer = _tokenizer_facts(cfg, info, sets[0].manifest.directory)
        train_data = _facts(sets)
        if cfg.model.vocab_size is not None and cfg.model.vocab_size < info.vocab_size:
            raise ConfigError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's "
                              f"{info.vocab_size} recorded in the shard manifest ({cfg.data.path}); remove it or "
                              f"make it >= {info.vocab_size}")
    vocab = cfg.model.vocab_size or (tokenizer.vocab_size if tokenizer else vocab_without_data)
    layout = resolve_layout(cfg, world_size, vocab)
    args = cfg.model.args(vocab)
    model = args.replace(vocab_size=layout.padded_vocab_size, max_seq_len=max(args.max_seq_len, cfg.train.seq_len))

    val_data = None
    if sets:
        _splittable("data.path", sets, layout, cfg.data.num_workers)
        if cfg.data.val_path:
            val_sets = _shard_sets("data.val_path", cfg.data.val_path)
            _same_tokenizer("data.val_path", val_sets, tokenizer.identity, f"data.path ({sets[0].spec})")
            _splittable("data.val_path", val_sets, layout, cfg.data.num_workers)
            val_data = _facts(val_sets)
    run = ResolvedRun(layout=layout, model=model, tokenizer=tokenizer, train_data=train_data, val_data=val_data,
                      seq_len=cfg.train.seq_len, dtype=cfg.train.dtype, zero_stage=cfg.parallel.zero_stage)
    return run


def held_out_note(cfg: Config, run: ResolvedRun) -> str | None:
    """Validation shards smaller than what one eval reads per DP rank are read round and round (the loss is still
    held-out, but over fewer distinct tokens than the eval's size suggests): a one-line note, else None."""
    if run.val_data is None or cfg.train.eval_every == 0:
        return None
    reads = cfg.train.eval_steps * run.layout.micro_batch_size * (run.seq_len + 1)
    holds = run.val_data.tokens // run.layout.dp
    if holds >= reads:
        return None
    return (f"note: data.val_path holds ~{holds:,} tokens per DP rank but one eval reads {reads:,} "
            "(train.eval_steps x train.micro_batch_size x (train.seq_len + 1)): its documents repeat within an eval")
