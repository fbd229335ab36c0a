"""Fixtures for the data pipeline tests: real corpus files in every format, a trained tokenizer, real shards.

Everything is made on disk in a temp dir by the same code a user runs; nothing is mocked.
"""
from __future__ import annotations

import gzip
from pathlib import Path

import pytest
from dp_helpers import SPECIAL_DOCS, make_docs, run_cli, write_jsonl, write_parquet, write_zst


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> dict:
    """One corpus in all five formats; returns {"dir", "files", "docs": {path: [texts in file order]}}."""
    root = tmp_path_factory.mktemp("corpus")
    docs = {}
    a = make_docs(60, seed=1, prefix="plain") + SPECIAL_DOCS
    docs[str(write_jsonl(root / "a.jsonl", a))] = a
    b = make_docs(50, seed=2, prefix="gzip")
    docs[str(write_jsonl(root / "b.jsonl.gz", b, opener=gzip.open))] = b
    c = make_docs(50, seed=3, prefix="zstd")
    docs[str(write_zst(root / "c.jsonl.zst", c))] = c
    d = make_docs(45, seed=4, prefix="parquet")
    docs[str(write_parquet(root / "d.parquet", d))] = d
    e = "A plain text file.\nIt is one document, whatever its lines.\n"
    (root / "e.txt").write_text(e, encoding="utf-8")
    docs[str(root / "e.txt")] = [e]
    return {"dir": root, "files": sorted(docs), "docs": docs}


@pytest.fixture(scope="session")
def tokenizer_dir(corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tok")
    proc = run_cli("train-tokenizer", "--input", str(corpus["dir"]), "--vocab-size", "400", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    return out


@pytest.fixture(scope="session")
def shards(corpus, tokenizer_dir, tmp_path_factory) -> Path:
    """The corpus prepared with the CLI into several small shards (2 worker processes)."""
    out = tmp_path_factory.mktemp("shards") / "out"
    proc = run_cli("prepare", "--input", str(corpus["dir"]), "--tokenizer", str(tokenizer_dir), "--out", str(out),
                   "--shard-size-mb", "0.02", "--workers", "2")
    assert proc.returncode == 0, proc.stderr
    return out


