"""`manifest.json`: what a shard directory holds, written last by `prepare`.

It records the tokenizer identity (so shards, model and tokenizer can be checked against each other), the token
dtype, per-shard sample/token counts, sizes and sha256, totals, skipped-document counts and the command line.
The loader needs the per-shard sample counts to split an epoch across DP ranks and workers at sample granularity,
so every source the loader reads must have one.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import tempfile
from dataclasses import dataclass, field

from data_pipeline.errors import ManifestError, TokenizerError

MANIFEST_NAME = "manifest.json"
FORMAT = "llama-pretrain-token-shards"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class ShardInfo:
    name: str     # file name relative to the manifest's directory, e.g. "shard-000000.tar"
    samples: int  # documents in the shard
    tokens: int   # token ids in the shard, eos included
    bytes: int    # tar file size
    sha256: str


@dataclass(frozen=True)
class TokenizerInfo:
    identity: str  # TextTokenizer.identity: hash of what decides ids
    kind: str      # "hf" | "sentencepiece" | "synthetic" (tests)
    vocab_size: int
    eos_id: int
    bos_id: int | None = None
    pad_id: int | None = None
    path: str = ""  # absolute path it was loaded from when the shards were made (training copies it from there)


@dataclass(frozen=True)
class Manifest:
    tokenizer: TokenizerInfo
    dtype: str                       # "uint16" | "uint32": numpy dtype of tokens.npy
    shards: tuple[ShardInfo, ...]
    command: tuple[str, ...] = ()    # the command line that made the shards
    skipped: dict = field(default_factory=dict)  # reason -> count, from --skip-bad
    created: str = ""
    directory: str = ""              # where it was read from (not serialised)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    @property
    def tokenizer_hash(self) -> str:
        return self.tokenizer.identity

    @property
    def eos_id(self) -> int:
        return self.tokenizer.eos_id

    @property
    def bos_id(self) -> int | None:
        return self.tokenizer.bos_id

    @property
    def pad_id(self) -> int | None:
        return self.tokenizer.pad_id

    @property
    def total_samples(self) -> int:
        return sum(s.samples for s in self.shards)

    @property
    def total_tokens(self) -> int:
        return sum(s.tokens for s in self.shards)

    @property
    def fingerprint(self) -> str:
        """Hash of the data itself (tokenizer, dtype, every shard's name/counts/sha256): a resume cursor is only
        meaningful for the exact same shards."""
        parts = [self.tokenizer.identity, self.dtype] + [f"{s.name}:{s.samples}:{s.tokens}:{s.sha256}"
                                                          for s in self.shards]
        return hashlib.sha256("\n".join(parts).encode()).hexdigest()

    def to_json(self) -> str:
        body = {
            "format": FORMAT, "format_version": FORMAT_VERSION,
            "tokenizer": dataclasses.asdict(self.tokenizer), "dtype": self.dtype,
            "total_samples": self.total_samples, "total_tokens": self.total_tokens,
            "shards": [dataclasses.asdict(s) for s in self.shards],
            "skipped": dict(self.skipped), "command": list(self.command), "created": self.created,
        }
        return json.dumps(body, indent=1)


_SHA256 = re.compile(r"[0-9a-f]{64}")


def _is_int(value: object) -> bool:
    return type(value) is int  # JSON true/false and 5.0 are not counts


def _count(value: object, where: str, low: int = 0, meaning: str = "") -> None:
    if not _is_int(value) or value < low:
        raise ManifestError(f"{where} is {json.dumps(value)}, expected an integer >= {low}{meaning}")


def _check_tokenizer_fields(tok: TokenizerInfo, where: str) -> None:
    """The tokenizer's ids are what every token is checked against: they must be ids of its vocabulary."""
    _count(tok.vocab_size, f"{where}: tokenizer.vocab_size", 1)
    for key in ("identity", "kind", "path"):
        if not isinstance(getattr(tok, key), str):
            raise ManifestError(f"{where}: tokenizer.{key} is {json.dumps(getattr(tok, key))}, expected a string")
    if not _is_int(tok.eos_id) or not 0 <= tok.eos_id < tok.vocab_size:  # it ends every document
        raise ManifestError(f"{where}: tokenizer.eos_id is {json.dumps(tok.eos_id)}, expected an id in "
                            f"[0, {tok.vocab_size})")
    for key in ("bos_id", "pad_id"):
        value = getattr(tok, key)
        if value is not None and (not _is_int(value) or value < 0):
            raise ManifestError(f"{where}: tokenizer.{key} is {json.dumps(value)}, expected an id >= 0 or null")


def _check_shard_fields(shard: ShardInfo, where: str) -> None:
    """One shard entry: what the loader splits epochs by (samples), weighs sources by (tokens) and checks each
    shard against as it streams (bytes, sha256); a nonsense value is refused here, naming the entry and field."""
    if not isinstance(shard.name, str) or not shard.name or shard.name in (".", "..") or "/" in shard.name \
            or "\\" in shard.name:
        raise ManifestError(f"{where}.name is {json.dumps(shard.name)}, expected a shard file name in the "
                            "manifest's directory")
    where = f"{where} ({shard.name})"
    _count(shard.samples, f"{where}.samples")
    _count(shard.tokens, f"{where}.tokens", shard.samples if _is_int(shard.samples) else 0,
           " (its samples: every document ends with eos)")
    _count(shard.bytes, f"{where}.bytes")
    if not isinstance(shard.sha256, str) or not _SHA256.fullmatch(shard.sha256):
        raise ManifestError(f"{where}.sha256 is {json.dumps(shard.sha256)}, expected 64 lowercase hex digits")


def parse_manifest(text: str, where: str) -> Manifest:
    """Parse manifest JSON text; `where` names it in errors."""
    try:
        body = json.loads(text)
    except ValueError as e:
        raise ManifestError(f"{where}: not valid JSON ({e})") from None
    if not isinstance(body, dict) or body.get("format") != FORMAT:
        raise ManifestError(f"{where}: not a token-shard manifest (no \"format\": \"{FORMAT}\")")
    if body.get("format_version") != FORMAT_VERSION:
        raise ManifestError(f"{where}: format_version {body.get('format_version')} is not supported "
                            f"(this code reads {FORMAT_VERSION})")
    try:
        tok = TokenizerInfo(**body["tokenizer"])
        shards = tuple(ShardInfo(**s) for s in body["shards"])
        manifest = Manifest(tokenizer=tok, dtype=body["dtype"], shards=shards,
                            command=tuple(body.get("command", ())), skipped=dict(body.get("skipped", {})),
                            created=body.get("created", ""))
    except (KeyError, TypeError) as e:
        raise ManifestError(f"{where}: missing or unexpected field ({e})") from None
    if manifest.dtype not in ("uint16", "uint32"):
        raise ManifestError(f"{where}: dtype {manifest.dtype!r} is not uint16/uint32")
    _check_tokenizer_fields(manifest.tokenizer, where)
    seen: set[str] = set()
    for i, shard in enumerate(manifest.shards):
        _check_shard_fields(shard, f"{where}: shards[{i}]")
        if shard.name in seen:
            raise ManifestError(f"{where}: shards[{i}].name {shard.name!r} is listed twice")
        seen.add(shard.name)
    if body.get("total_tokens") != manifest.total_tokens or body.get("total_samples") != manifest.total_samples:
        raise ManifestError(f"{where}: totals do not match the sum of its shards (edited by hand?)")
    return manifest


def read_manifest(path: str) -> Manifest:
    """Read `path/manifest.json` (or the manifest file itself). One-line ManifestError if missing or bad."""
    file = os.path.join(path, MANIFEST_NAME) if os.path.isdir(path) else path
    try:
        with open(file, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise ManifestError(f"{file}: no manifest (is this a directory made by `pretrain-data prepare`?)") from None
    except OSError as e:
        raise ManifestError(f"{file}: cannot read ({e})") from None
    return dataclasses.replace(parse_manifest(text, file), directory=os.path.dirname(os.path.abspath(file)))


def write_manifest(directory: str, manifest: Manifest) -> str:
    """Write manifest.json under a temp name and rename: a reader never sees half a manifest."""
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".manifest-", suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(manifest.to_json())
        f.flush()
        os.fsync(f.fileno())
    final = os.path.join(directory, MANIFEST_NAME)
    os.replace(tmp, final)
    return final


def check_tokenizer(manifest: Manifest, tokenizer, where: str = "") -> None:
    """Raise if `tokenizer` is not the one the shards were made with (ids would silently mean other text)."""
    if tokenizer.identity != manifest.tokenizer.identity:
        name = where or manifest.directory or "shards"
        raise TokenizerError(
            f"{name}: tokenizer {tokenizer.path} (hash {tokenizer.identity[:12]}, vocab {tokenizer.vocab_size}) "
            f"does not match the manifest's tokenizer (hash {manifest.tokenizer.identity[:12]}, vocab "
            f"{manifest.tokenizer.vocab_size}, made from {manifest.tokenizer.path or '?'})")
