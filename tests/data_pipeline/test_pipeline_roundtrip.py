"""Corpus -> tokenizer -> shards -> plain webdataset reader -> decode == the original documents."""
from __future__ import annotations

import os
import tarfile

import numpy as np
import webdataset as wds
from dp_helpers import make_docs, run_cli, run_main, write_jsonl

from data_pipeline.manifest import read_manifest
from data_pipeline.prepare import prepare
from data_pipeline.tokenizer import load_tokenizer


def _read_back(shard_dir) -> list[dict]:
    """Every sample, via a plain webdataset reader with its default decoder (none of our code)."""
    m = read_manifest(str(shard_dir))
    urls = [os.path.join(shard_dir, s.name) for s in m.shards]
    return list(wds.WebDataset(urls, shardshuffle=False).decode())


def test_round_trip_all_formats_gives_back_every_document(corpus, tokenizer_dir, shards):
    tok = load_tokenizer(str(tokenizer_dir))
    samples = _read_back(shards)
    m = read_manifest(str(shards))
    assert len(m.shards) >= 3, "the fixture should span several shards"
    expected = [(f"{path}:{i + 1}" if not path.endswith(".txt") else path, text)
                for path in corpus["files"] for i, text in enumerate(corpus["docs"][path])]
    assert len(samples) == len(expected) == m.total_samples
    for sample, (source_id, text) in zip(samples, expected):
        tokens = sample["tokens.npy"]
        assert tokens.dtype == np.uint16 and tokens[-1] == tok.eos_id
        assert (tokens[:-1] != tok.eos_id).all(), "the literal '<|end_of_text|>' text must not become the eos id"
        assert tok.decode(tokens[:-1]) == text
        assert sample["source.txt"] == source_id
    assert sum(len(s["tokens.npy"]) for s in samples) == m.total_tokens
    assert len({s["__key__"] for s in samples}) == len(samples)


def test_manifest_records_tokenizer_counts_checksums_and_command(capsys, shards, tokenizer_dir):
    m = read_manifest(str(shards))
    tok = load_tokenizer(str(tokenizer_dir))
    assert (m.tokenizer_hash, m.vocab_size, m.eos_id, m.bos_id, m.pad_id) == (
        tok.identity, 400, tok.eos_id, tok.bos_id, tok.pad_id)
    assert m.dtype == "uint16"
    assert m.command[:2] == ("pretrain-data", "prepare") and "--workers" in m.command
    for s in m.shards:
        with tarfile.open(os.path.join(shards, s.name)) as t:
            assert len(t.getnames()) == 2 * s.samples  # tokens.npy + source.txt per sample
    proc = run_main(capsys, "verify", str(shards), "--tokenizer", str(tokenizer_dir))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"OK {shards}: {len(m.shards)} shards")


def test_output_is_identical_whatever_the_worker_count(corpus, tokenizer_dir, shards, tmp_path):
    """Order is input order and shards are byte-reproducible, so workers=0 (in-process) == workers=2."""
    r = prepare([str(corpus["dir"])], str(tokenizer_dir), str(tmp_path / "w0"), shard_size_mb=0.02, workers=0,
                progress=False)
    assert [s.sha256 for s in r.manifest.shards] == [s.sha256 for s in read_manifest(str(shards)).shards]


def test_prepare_refuses_a_non_empty_dir_unless_overwrite(capsys, corpus, tokenizer_dir, tmp_path):
    out = tmp_path / "out"
    args = ["prepare", "--input", str(corpus["dir"] / "a.jsonl"), "--tokenizer", str(tokenizer_dir),
            "--out", str(out), "--no-progress"]
    assert run_main(capsys, *args).returncode == 0
    proc = run_main(capsys, *args)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"pretrain-data prepare: error: {out}: directory is not empty (2 entries, e.g. manifest.json); "
        "pass --overwrite to replace its shards"]
    proc = run_main(capsys, *args, "--overwrite")
    assert proc.returncode == 0, proc.stderr
    assert "wrote 1 shards" in proc.stdout and "tokens/s" in proc.stdout


def test_failed_run_leaves_no_partial_shard_and_no_manifest(capsys, tokenizer_dir, tmp_path):
    """A run that dies half way (here: a bad line after ~2 shards) leaves only complete shards, no manifest."""
    docs = make_docs(3000, seed=9)
    path = write_jsonl(tmp_path / "c.jsonl", docs)
    with open(path, "a") as f:
        f.write("{not json\n")
    out = tmp_path / "out"
    proc = run_main(capsys, "prepare", "--input", str(path), "--tokenizer", str(tokenizer_dir), "--out", str(out),
                    "--shard-size-mb", "0.02", "--workers", "1", "--no-progress")
    assert proc.returncode == 2
    names = sorted(os.listdir(out))
    assert names and all(n.startswith("shard-") and n.endswith(".tar") for n in names), names
    for n in names:  # every file under a final name is a complete tar
        with tarfile.open(out / n) as t:
            assert len(t.getnames()) > 0


def test_cli_help_lists_the_subcommands():
    proc = run_cli("--help")
    assert proc.returncode == 0
    for cmd in ("train-tokenizer", "prepare", "verify", "inspect"):
        assert cmd in proc.stdout
    proc = run_cli("prepare", "--help")
    assert "--shard-size-mb" in proc.stdout and "--skip-bad" in proc.stdout


def test_inspect_shows_totals_and_decoded_text(capsys, shards, tokenizer_dir):
    proc = run_main(capsys, "inspect", str(shards), "--samples", "2")
    assert proc.returncode == 0, proc.stderr
    m = read_manifest(str(shards))
    assert f"{m.total_samples:,} documents" in proc.stdout
    assert "'plain 0: " in proc.stdout  # decoded with the manifest's tokenizer


def test_progress_bar_reports_docs_and_tokens_per_second(capsys, corpus, tokenizer_dir, tmp_path):
    prepare([str(corpus["dir"] / "a.jsonl")], str(tokenizer_dir), str(tmp_path / "o"), workers=0, progress=True)
    err = capsys.readouterr().err
    assert "docs/s" in err and "tokens/s" in err and "65 docs" in err


def test_killed_prepare_leaves_only_complete_shards_under_final_names(tokenizer_dir, tmp_path):
    """SIGKILL mid-run (no cleanup code runs): files named shard-*.tar are complete, the rest is *.tmp."""
    import multiprocessing
    import time

    path = write_jsonl(tmp_path / "big.jsonl", make_docs(20000, seed=3))
    out = tmp_path / "out"
    # a forked child runs the real prepare (no new interpreter to start); SIGKILL runs no cleanup code at all
    child = multiprocessing.get_context("fork").Process(target=prepare, args=([str(path)], str(tokenizer_dir),
                                                                                str(out)),
                                                       kwargs=dict(shard_size_mb=0.05, workers=0, progress=False))
    child.start()
    deadline = time.time() + 60
    while time.time() < deadline and child.is_alive():
        if out.exists() and len([n for n in os.listdir(out) if n.endswith(".tar")]) >= 2:
            break
        time.sleep(0.01)
    assert child.is_alive(), "prepare finished before it could be killed"
    child.kill()
    child.join()
    names = os.listdir(out)
    assert "manifest.json" not in names
    finals = [n for n in names if n.endswith(".tar")]
    assert finals and all(n.endswith((".tar", ".tar.tmp")) for n in names), names
    for n in finals:
        with tarfile.open(out / n) as t:  # complete: a truncated tar would raise here
            assert len(t.getmembers()) % 2 == 0 and t.getmembers()
