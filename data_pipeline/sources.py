"""Raw corpus files -> a stream of documents `(source_id, text)`.

Formats: JSONL (plain, `.gz`, `.zst`) with a text key, Parquet with a text column, and `.txt` (one file = one
document). `source_id` is `file:line` (JSONL), `file:row` (Parquet) or `file` (txt): it is stored with every
sample, so a strange sample in a shard can be traced back to the line it came from.

Bad input is an error naming file and line, unless the caller passes a `SkipCounter` (`--skip-bad`): then the
document is skipped and counted by reason, and the counts are reported at the end and kept in the manifest.
Nothing is ever dropped silently.
"""
from __future__ import annotations

import glob
import gzip
import json
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterator

from data_pipeline.errors import SourceError

JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson", ".jsonl.gz", ".json.gz", ".ndjson.gz", ".jsonl.zst",
                  ".json.zst", ".ndjson.zst")
PARQUET_SUFFIXES = (".parquet",)
TEXT_SUFFIXES = (".txt",)
SUPPORTED = JSONL_SUFFIXES + PARQUET_SUFFIXES + TEXT_SUFFIXES


@dataclass(frozen=True)
class Document:
    source_id: str  # "file:line" / "file:row" / "file": where the text came from
    text: str


@dataclass
class SkipCounter:
    """Counts skipped documents by reason (opt-in via --skip-bad) and remembers the first few locations."""

    counts: Counter = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)
    max_examples: int = 5

    def skip(self, reason: str, message: str) -> None:
        self.counts[reason] += 1
        if len(self.examples) < self.max_examples:
            self.examples.append(message)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> str:
        if not self.total:
            return "skipped 0 bad documents"
        parts = ", ".join(f"{n} {reason}" for reason, n in sorted(self.counts.items()))
        return f"skipped {self.total} bad documents ({parts}); first: {self.examples[0]}"


def expand_inputs(patterns: list[str]) -> list[str]:
    """Paths, globs and directories -> a sorted, de-duplicated list of supported files (sorted = reproducible)."""
    files: list[str] = []
    for pattern in patterns:
        if os.path.isdir(pattern):
            found = [os.path.join(root, name) for root, _, names in os.walk(pattern) for name in names
                     if name.endswith(SUPPORTED)]
        else:
            found = glob.glob(pattern, recursive=True) if glob.has_magic(pattern) else (
                [pattern] if os.path.exists(pattern) else [])
        if not found:
            raise SourceError(f"{pattern}: no such file (or the pattern matches nothing)")
        for path in found:
            if not path.endswith(SUPPORTED):
                raise SourceError(f"{path}: unsupported file type (expected one of {', '.join(SUPPORTED)})")
        files.extend(found)
    return sorted(set(files))


def _zstd_lines(path: str) -> Iterator[bytes]:
    """Lines of a .zst file (several frames allowed). Unlike zstandard's stream_reader, a file cut short
    inside a frame is an error here, not a silent early end (a cut at a line boundary would lose data)."""
    import zstandard

    dctx = zstandard.ZstdDecompressor()
    dobj, in_frame = dctx.decompressobj(), False
    pending = b""
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            while chunk:
                pending += dobj.decompress(chunk)
                in_frame, chunk = True, b""
                if dobj.eof:  # frame finished; the rest of this chunk starts the next frame
                    chunk, dobj, in_frame = dobj.unused_data, dctx.decompressobj(), False
            *lines, pending = pending.split(b"\n")
            for line in lines:
                yield line + b"\n"
    if in_frame:
        raise EOFError("zstd stream ends inside a frame (file truncated?)")
    if pending:
        yield pending


def _lines(path: str) -> Iterator[bytes]:
    if path.endswith(".zst"):
        yield from _zstd_lines(path)
        return
    with (gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb", buffering=1 << 20)) as f:
        yield from f


def _reject(skip: SkipCounter | None, reason: str, msg: str, unit: str | None) -> None:
    """The one policy for a bad record: a one-line error naming it, or (with --skip-bad) a counted skip."""
    if skip is None:
        hint = f" (pass --skip-bad to skip and count such {unit})" if unit else ""
        raise SourceError(msg + hint) from None
    skip.skip(reason, msg)


def _check_text(text: object, where: str, text_key: str, skip: SkipCounter | None) -> str | None:
    """Return the text if it is a usable document; else raise (or count and return None)."""
    if not isinstance(text, str):
        reason, msg = (("missing_text", f"{where}: no '{text_key}' (missing or null)") if text is None
                       else ("not_text", f"{where}: '{text_key}' is {type(text).__name__}, not a string"))
    elif not text.strip():
        reason, msg = "empty", f"{where}: empty document"
    else:
        try:
            text.encode("utf-8")  # JSON "\ud800" escapes give lone surrogates: not valid Unicode text
            return text
        except UnicodeEncodeError as e:
            reason, msg = "invalid_utf8", f"{where}: invalid UTF-8 (lone surrogate at character {e.start})"
    _reject(skip, reason, msg, "documents")
    return None


def _read_jsonl(path: str, text_key: str, skip: SkipCounter | None) -> Iterator[Document]:
    lineno = 0
    try:
        for lineno, raw in enumerate(_lines(path), start=1):
            where = f"{path}:{lineno}"
            if not raw.strip():
                continue  # blank lines between records are not documents
            try:
                line = raw.rstrip(b"\r\n").decode("utf-8")
            except UnicodeDecodeError as e:
                _reject(skip, "invalid_utf8", f"{where}: invalid UTF-8 at byte {e.start}", "lines")
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                _reject(skip, "malformed_json", f"{where}: malformed JSON: {e.msg} (column {e.colno})", "lines")
                continue
            if not isinstance(record, dict):
                _reject(skip, "not_object", f"{where}: expected a JSON object, got {type(record).__name__}", None)
                continue
            text = _check_text(record.get(text_key), where, text_key, skip)
            if text is not None:
                yield Document(f"{path}:{lineno}", text)
    except (OSError, EOFError) as e:  # gzip/zstd corruption, truncated archives
        raise SourceError(f"{path}: cannot read after line {lineno} ({e})") from None
    except Exception as e:
        if "zstd" in type(e).__module__.lower() or "zstd" in type(e).__name__.lower():
            raise SourceError(f"{path}: corrupt zstd stream after line {lineno} ({e})") from None
        raise


def _read_parquet(path: str, text_key: str, skip: SkipCounter | None) -> Iterator[Document]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as e:
        raise SourceError(f"{path}: not a readable Parquet file ({e})") from None
    names = pf.schema_arrow.names
    if text_key not in names:
        raise SourceError(f"{path}: no column '{text_key}' (columns: {', '.join(names)}); use --text-key")
    col_type = pf.schema_arrow.field(text_key).type
    if not (pa.types.is_string(col_type) or pa.types.is_large_string(col_type)):
        raise SourceError(f"{path}: column '{text_key}' has type {col_type}, expected string")
    row = 0
    for batch in pf.iter_batches(batch_size=4096, columns=[text_key]):
        for value in batch.column(0).to_pylist():
            row += 1
            text = _check_text(value, f"{path}:row {row}", text_key, skip)
            if text is not None:
                yield Document(f"{path}:{row}", text)


def _read_txt(path: str, skip: SkipCounter | None) -> Iterator[Document]:
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        _reject(skip, "invalid_utf8", f"{path}: invalid UTF-8 at byte {e.start}", "files")
        return
    text = _check_text(text, path, "text", skip)
    if text is not None:
        yield Document(path, text)


def read_documents(path: str, text_key: str = "text", skip: SkipCounter | None = None) -> Iterator[Document]:
    """Documents of one file, in file order."""
    if path.endswith(JSONL_SUFFIXES):
        yield from _read_jsonl(path, text_key, skip)
    elif path.endswith(PARQUET_SUFFIXES):
        yield from _read_parquet(path, text_key, skip)
    elif path.endswith(TEXT_SUFFIXES):
        yield from _read_txt(path, skip)
    else:
        raise SourceError(f"{path}: unsupported file type (expected one of {', '.join(SUPPORTED)})")


def iter_documents(files: list[str], text_key: str = "text", skip: SkipCounter | None = None) -> Iterator[Document]:
    """Documents of all files, files in the given order."""
    for path in files:
        yield from read_documents(path, text_key, skip)
