"""Every bad input gets ONE line naming file and line (or shard), or a counted skip with --skip-bad."""
from __future__ import annotations

import gzip
import json
import os
import shutil

import pytest
from dp_helpers import make_docs, run_main, write_jsonl, write_parquet, write_synthetic_shards, write_zst

from data_pipeline.errors import ShardError
from data_pipeline.loader import TokenLoader
from data_pipeline.manifest import read_manifest
from data_pipeline.tokenizer import train_bpe

GOOD = json.dumps({"text": "a perfectly good document"})


def _jsonl(tmp_path, name: str, lines: list[bytes]):
    path = tmp_path / name
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def _one_line_error(proc) -> str:
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


BAD_LINES = [  # (name, the bad line as bytes, expected message after "file:3: ")
    ("malformed_json", b'{"text": "unterminated', "malformed JSON: Unterminated string starting at (column 10)"),
    ("missing_key", json.dumps({"body": "x"}).encode(), "no 'text' (missing or null)"),
    ("invalid_utf8", b'{"text": "caf\xe9"}', "invalid UTF-8 at byte 13"),
    ("empty", json.dumps({"text": "  \n "}).encode(), "empty document"),
    ("lone_surrogate", b'{"text": "bad \\ud800 escape"}', "invalid UTF-8 (lone surrogate at character 4)"),
    ("not_object", b'["text"]', "expected a JSON object, got list"),
]


@pytest.mark.parametrize("name,line,message", BAD_LINES, ids=[b[0] for b in BAD_LINES])
def test_bad_jsonl_line_is_one_line_error_naming_file_and_line(capsys, tmp_path, tokenizer_dir, name, line, message):
    path = _jsonl(tmp_path, f"{name}.jsonl", [GOOD.encode(), GOOD.encode(), line, GOOD.encode()])
    proc = run_main(capsys, "prepare", "--input", str(path), "--tokenizer", str(tokenizer_dir),
                    "--out", str(tmp_path / "out"), "--no-progress", "--workers", "0")
    assert _one_line_error(proc).startswith(f"pretrain-data prepare: error: {path}:3: {message}")


def test_skip_bad_counts_every_kind_and_records_it_in_the_manifest(capsys, tmp_path, tokenizer_dir):
    lines = [GOOD.encode()] + [line for _, line, _ in BAD_LINES] + [GOOD.encode()]
    path = _jsonl(tmp_path, "mixed.jsonl", lines)
    out = tmp_path / "out"
    proc = run_main(capsys, "prepare", "--input", str(path), "--tokenizer", str(tokenizer_dir), "--out", str(out),
                    "--no-progress", "--skip-bad")
    assert proc.returncode == 0, proc.stderr
    assert (f"skipped 6 bad documents (1 empty, 2 invalid_utf8, 1 malformed_json, 1 missing_text, 1 not_object); "
            f"first: {path}:2: malformed JSON") in proc.stdout
    m = read_manifest(str(out))
    assert m.total_samples == 2
    assert m.skipped == {"malformed_json": 1, "missing_text": 1, "invalid_utf8": 2, "empty": 1, "not_object": 1}


def test_parquet_missing_column_and_null_text(capsys, tmp_path, tokenizer_dir):
    path = write_parquet(tmp_path / "p.parquet", ["one", "two"], key="body")
    args = ["prepare", "--input", str(path), "--tokenizer", str(tokenizer_dir), "--no-progress"]
    proc = run_main(capsys, *args, "--out", str(tmp_path / "o1"))
    assert _one_line_error(proc).endswith(f"{path}: no column 'text' (columns: body, n); use --text-key")
    assert run_main(capsys, *args, "--out", str(tmp_path / "o2"), "--text-key", "body").returncode == 0

    import pyarrow as pa
    import pyarrow.parquet as pq

    nulls = tmp_path / "nulls.parquet"
    pq.write_table(pa.table({"text": ["fine", "also fine", None]}), nulls)
    proc = run_main(capsys, "prepare", "--input", str(nulls), "--tokenizer", str(tokenizer_dir), "--no-progress",
                    "--out", str(tmp_path / "o3"))
    assert _one_line_error(proc).endswith(f"{nulls}:row 3: no 'text' (missing or null) (pass --skip-bad to skip "
                                          "and count such documents)")


def test_invalid_utf8_txt_and_truncated_gzip_and_zstd(capsys, tmp_path, tokenizer_dir):
    txt = tmp_path / "bad.txt"
    txt.write_bytes(b"fine start \xff\xfe then junk")
    proc = run_main(capsys, "prepare", "--input", str(txt), "--tokenizer", str(tokenizer_dir), "--no-progress",
                    "--out", str(tmp_path / "o1"))
    assert _one_line_error(proc).endswith(f"{txt}: invalid UTF-8 at byte 11 (pass --skip-bad to skip and count "
                                          "such files)")
    gz = write_jsonl(tmp_path / "t.jsonl.gz", make_docs(400), opener=gzip.open)
    gz.write_bytes(gz.read_bytes()[: os.path.getsize(gz) // 2])
    proc = run_main(capsys, "prepare", "--input", str(gz), "--tokenizer", str(tokenizer_dir), "--no-progress",
                    "--out", str(tmp_path / "o2"))
    assert "cannot read after line" in _one_line_error(proc) and str(gz) in proc.stderr
    # zstandard's stream reader ends silently at a cut; a cut at a line boundary would lose documents unseen
    zst = write_zst(tmp_path / "t.jsonl.zst", make_docs(400))
    zst.write_bytes(zst.read_bytes()[: os.path.getsize(zst) // 2])
    proc = run_main(capsys, "prepare", "--input", str(zst), "--tokenizer", str(tokenizer_dir), "--no-progress",
                    "--out", str(tmp_path / "o3"))
    assert _one_line_error(proc).startswith(f"pretrain-data prepare: error: {zst}: cannot read after line ")
    assert proc.stderr.rstrip().endswith("(zstd stream ends inside a frame (file truncated?))")


def test_missing_input_and_missing_manifest(capsys, tmp_path, tokenizer_dir):
    proc = run_main(capsys, "prepare", "--input", str(tmp_path / "nope-*.jsonl"), "--tokenizer",
                    str(tokenizer_dir), "--out", str(tmp_path / "o"))
    assert _one_line_error(proc).endswith(f"{tmp_path}/nope-*.jsonl: no such file (or the pattern matches nothing)")
    proc = run_main(capsys, "verify", str(tmp_path))
    assert _one_line_error(proc).endswith(f"{tmp_path}/manifest.json: no manifest (is this a directory made by "
                                          "`pretrain-data prepare`?)")


@pytest.fixture()
def shard_copy(shards, tmp_path):
    """A private copy of the prepared shards to damage."""
    out = tmp_path / "shards"
    shutil.copytree(shards, out)
    return out


def test_truncated_shard_named_by_verify_and_loader(capsys, shard_copy):
    victim = shard_copy / "shard-000001.tar"
    size = os.path.getsize(victim)
    victim.write_bytes(victim.read_bytes()[: size - 3000])
    proc = run_main(capsys, "verify", str(shard_copy))
    assert proc.returncode == 2
    assert (f"BAD shard-000001.tar: {size - 3000} bytes on disk, manifest says {size} (truncated or replaced)"
            in proc.stderr)
    assert proc.stderr.strip().splitlines()[-1].startswith(f"FAILED {shard_copy}: 1 problem(s)")
    with pytest.raises(ShardError, match=rf"^{victim}: {size - 3000} bytes on disk, manifest says {size} "):
        TokenLoader(str(shard_copy), seq_len=32, batch_size=2)


def _corrupt(path, offset: int, data: bytes = b"\xde\xad\xbe\xef" * 16) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset:offset + len(data)] = data
    path.write_bytes(bytes(raw))


def test_checksum_mismatch_named_by_verify(capsys, shard_copy):
    _corrupt(shard_copy / "shard-000002.tar", 512 + 200)  # inside the first member's data: tar still parses
    proc = run_main(capsys, "verify", str(shard_copy))
    assert proc.returncode == 2
    assert "BAD shard-000002.tar: sha256 mismatch (file changed since prepare: corrupt copy?)" in proc.stderr


@pytest.mark.parametrize("workers", [0, 2])
def test_corrupt_tar_is_one_line_from_verify_and_loader_or_a_counted_skip(capsys, shard_copy, workers, caplog):
    m = read_manifest(str(shard_copy))
    victim = shard_copy / "shard-000001.tar"
    _corrupt(victim, 4 * 1024)  # lands on a tar header a few samples in
    proc = run_main(capsys, "verify", str(shard_copy), "--no-checksums")
    assert proc.returncode == 2
    assert (f"BAD shard-000001.tar: 2 samples / 86 tokens, manifest says {m.shards[1].samples} / "
            f"{m.shards[1].tokens} (corrupt tar header or truncated file" in proc.stderr)
    loader = TokenLoader(str(shard_copy), seq_len=32, batch_size=2, num_workers=workers, epochs=1)
    with pytest.raises(ShardError) as err:
        for _ in loader:
            pass
    # the loader's tar reader checks header checksums (Python's tarfile would just stop early here)
    assert str(err.value) == (f"{victim}: corrupt or truncated tar after 1 complete samples (damaged header "
                              "(checksum mismatch))")
    # opted in: the bad shard is skipped with a log line, the rest of the epoch is read
    skipping = TokenLoader(str(shard_copy), seq_len=32, batch_size=2, num_workers=0, epochs=1, max_bad_shards=1)
    with caplog.at_level("WARNING"):
        n = sum(b["tokens"].numel() for b in skipping)
    assert "skipped (1/1 bad shards allowed)" in caplog.text and "are lost for this epoch" in caplog.text
    assert m.total_tokens - m.shards[1].tokens - 64 <= n < m.total_tokens


def test_tokenizer_not_matching_the_manifest(capsys, tmp_path, shards, corpus):
    other = tmp_path / "other_tok"
    train_bpe(iter(make_docs(200, seed=7)), 300, str(other), show_progress=False)
    proc = run_main(capsys, "verify", str(shards), "--tokenizer", str(other))
    assert proc.returncode == 2
    bad = [line for line in proc.stderr.splitlines() if line.startswith("BAD")]
    assert len(bad) == 1 and f"tokenizer {other} (hash " in bad[0] and "vocab 300) does not match the manifest's " \
        "tokenizer (hash" in bad[0] and "vocab 400" in bad[0]
    proc = run_main(capsys, "inspect", str(shards), "--tokenizer", str(other))
    assert "does not match the manifest's tokenizer" in _one_line_error(proc)


def test_counting_handler_replaces_warn_and_continue_in_plain_webdataset(shards, caplog):
    import time

    import webdataset as wds

    from data_pipeline.handlers import CountingHandler

    m = read_manifest(str(shards))
    urls = [str(shards / m.shards[0].name), str(shards / "missing.tar"), str(shards / m.shards[1].name)]
    start = time.perf_counter()
    with caplog.at_level("WARNING"):
        samples = list(wds.WebDataset(urls, shardshuffle=False, handler=CountingHandler(1, "bad shards")))
    assert len(samples) == m.shards[0].samples + m.shards[1].samples
    assert "skipped (1/1 bad shards allowed)" in caplog.text and "missing.tar" in caplog.text
    assert time.perf_counter() - start < 5  # no 0.5 s sleep per error
    with pytest.raises(ShardError, match=r"missing\.tar.*\(1 bad shards, more than the 0 allowed\)$"):
        list(wds.WebDataset(urls, shardshuffle=False, handler=CountingHandler(0, "bad shards")))


def test_a_token_id_outside_the_manifests_vocabulary_is_named(tmp_path):
    """A shard whose manifest is consistent (sizes, hashes, counts) but whose ids do not fit the manifest's
    tokenizer: one line naming the shard and sample, before any step indexes past the embedding table."""

    write_synthetic_shards(tmp_path, [4] * 6, first_value=60, vocab_size=64)  # document 4 is all 64s
    loader = TokenLoader(str(tmp_path), seq_len=7, batch_size=1, shuffle_buffer=1)
    with pytest.raises(ShardError, match=r"shard-000000.tar\[sample 4\]: token id 64 is outside the manifest's "
                                         r"tokenizer vocabulary \(64 ids\)"):
        for _ in loader:
            pass
