"""Helpers for the data pipeline tests: corpus writers in every format, the CLI runner, synthetic shards.

(A uniquely named module, not conftest.py, so tests can import it next to tests/conftest.py.)
"""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]

WORDS = ("the of and to in is was for on with as by at from that this which be are it an or have had not "
         "river mountain village winter summer light stone water letter story market garden bridge").split()
# Documents chosen to break naive pipelines: unicode in several scripts, emoji, whitespace at the edges,
# CRLF, tabs, and the literal text of the eos token (must stay text, never become the eos id).
SPECIAL_DOCS = [
    "  leading and trailing spaces  ",
    "line one\nline two\r\nline three\ttabbed",
    "Ünïcödé — naïve café, 日本語のテキスト, русский текст, العربية, emoji 🦙🚀",
    "this document mentions <|end_of_text|> and <|begin_of_text|> literally",
    "\n\nstarts with blank lines",
]


def make_docs(n: int, seed: int = 0, prefix: str = "doc") -> list[str]:
    rng = random.Random(seed)
    docs = [f"{prefix} {i}: " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 120))) + "."
            for i in range(n)]
    return docs


def write_jsonl(path: Path, docs: list[str], key: str = "text", opener=open) -> Path:
    with opener(path, "wt", encoding="utf-8") as f:
        for i, d in enumerate(docs):
            f.write(json.dumps({"id": i, key: d}, ensure_ascii=False) + "\n")
    return path


def write_zst(path: Path, docs: list[str]) -> Path:
    import zstandard

    raw = "".join(json.dumps({"text": d}) + "\n" for d in docs).encode("utf-8")
    path.write_bytes(zstandard.ZstdCompressor().compress(raw))
    return path


def write_parquet(path: Path, docs: list[str], key: str = "text") -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({key: docs, "n": list(range(len(docs)))}), path, row_group_size=7)
    return path


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """`python -m data_pipeline ARGS` for real (the console script may not be installed yet)."""
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    return subprocess.run([sys.executable, "-m", "data_pipeline", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=REPO)


def write_synthetic_shards(directory: Path, lengths: list[int], *, docs_per_shard: list[int] | None = None,
                           first_value: int = 1, eos: int = 0, vocab_size: int = 1 << 20) -> list[np.ndarray]:
    """Shards whose document i is `[first_value + i] * (len - 1) + [eos]`: any token says which doc it is from.

    Written with the real ShardSetWriter and manifest code; the "tokenizer" is a stand-in (kind synthetic).
    """
    from data_pipeline.manifest import Manifest, TokenizerInfo, write_manifest
    from data_pipeline.shard_writer import ShardSetWriter, npy_bytes

    directory.mkdir(parents=True, exist_ok=True)
    docs = []
    for i, n in enumerate(lengths):
        arr = np.full(n, first_value + i, dtype=np.uint32)
        arr[-1] = eos
        docs.append(arr)
    plan = docs_per_shard or [len(docs)]
    assert sum(plan) == len(docs)
    shards, start = [], 0
    for k, count in enumerate(plan):
        w = ShardSetWriter(str(directory), max_bytes=1 << 40)
        w.shards = shards  # continue numbering
        for j in range(start, start + count):
            w.write(f"{j:012d}", npy_bytes(docs[j]), len(docs[j]), f"synthetic:{j}")
        shards = w.close()
        start += count
    tok = TokenizerInfo(identity="synthetic-" + "0" * 52, kind="synthetic", vocab_size=vocab_size, eos_id=eos)
    write_manifest(str(directory), Manifest(tokenizer=tok, dtype="uint32", shards=tuple(shards),
                                            command=("test",)))
    return docs


def run_main(capsys, *args: str):
    """`pretrain-data ARGS` in this process (same code path as the console script, without paying for a new
    interpreter importing torch via webdataset on every call); returns returncode/stdout/stderr."""
    from types import SimpleNamespace

    from data_pipeline.cli import main

    capsys.readouterr()
    rc = main(list(args))
    out, err = capsys.readouterr()
    return SimpleNamespace(returncode=rc, stdout=out, stderr=err)
