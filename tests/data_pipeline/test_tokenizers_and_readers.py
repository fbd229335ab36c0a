"""Tokenizer loading/identity, the sample corpus, and the loader's tar reader vs webdataset's."""
from __future__ import annotations

import json
import os
import shutil

import pytest
from dp_helpers import make_docs, run_main

from data_pipeline import sample_corpus
from data_pipeline.errors import ShardError, TokenizerError
from data_pipeline.manifest import read_manifest
from data_pipeline.shard_reader import iter_raw_samples
from data_pipeline.tokenizer import load_tokenizer, token_dtype


def test_identity_survives_a_resave_but_not_a_vocab_change(tokenizer_dir, tmp_path):
    tok = load_tokenizer(str(tokenizer_dir))
    spec = json.loads((tokenizer_dir / "tokenizer.json").read_text())
    copy = tmp_path / "resaved"
    copy.mkdir()
    (copy / "tokenizer.json").write_text(json.dumps(spec, indent=4, sort_keys=True))  # other formatting
    assert load_tokenizer(str(copy)).identity == tok.identity
    spec["model"]["vocab"]["zzz-new-token"] = len(spec["model"]["vocab"]) + 10
    (copy / "tokenizer.json").write_text(json.dumps(spec))
    assert load_tokenizer(str(copy)).identity != tok.identity


def test_special_tokens_and_dtype(tokenizer_dir):
    tok = load_tokenizer(str(tokenizer_dir))
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2)
    ids = tok.encode_batch(["a <|end_of_text|> b"])[0]
    assert tok.eos_id not in ids and tok.decode(ids) == "a <|end_of_text|> b"
    assert token_dtype(65536).name == "uint16" and token_dtype(65537).name == "uint32"


def test_sentencepiece_model_prepares_and_verifies(capsys, tmp_path):
    import sentencepiece as spm

    text = tmp_path / "train.txt"
    text.write_text("\n".join(make_docs(300, seed=5)), encoding="utf-8")
    spm.SentencePieceTrainer.train(input=str(text), model_prefix=str(tmp_path / "sp"), vocab_size=300,
                                   model_type="bpe", bos_id=1, eos_id=2, pad_id=3, unk_id=0)
    model = str(tmp_path / "sp.model")
    tok = load_tokenizer(model)
    assert (tok.kind, tok.vocab_size, tok.eos_id, tok.pad_id) == ("sentencepiece", 300, 2, 3)
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps({"text": d}) for d in make_docs(40, seed=6)) + "\n")
    out = tmp_path / "shards"
    assert run_main(capsys, "prepare", "--input", str(data), "--tokenizer", model, "--out", str(out),
                    "--no-progress").returncode == 0
    m = read_manifest(str(out))
    assert m.tokenizer.kind == "sentencepiece" and m.tokenizer_hash == tok.identity and m.eos_id == 2
    assert run_main(capsys, "verify", str(out), "--tokenizer", model).returncode == 0


def test_unloadable_tokenizers_are_one_line_errors(capsys, tmp_path):
    with pytest.raises(TokenizerError, match=r"no tokenizer.json \(or a single sentencepiece .model\)"):
        load_tokenizer(str(tmp_path))
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not json")
    with pytest.raises(TokenizerError, match=rf"^{bad}: cannot load tokenizer"):
        load_tokenizer(str(tmp_path))
    proc = run_main(capsys, "train-tokenizer", "--input", str(bad), "--vocab-size", "100", "--out", str(tmp_path))
    assert proc.returncode == 2 and proc.stderr.strip() == (
        "pretrain-data train-tokenizer: error: --vocab-size 100 is too small: a byte-level BPE needs at least 259 "
        "(256 bytes + bos/eos/pad)")


def test_sample_corpus_is_offline_english_jsonl():
    path = sample_corpus.path()
    assert os.path.exists(path) and 300_000 < os.path.getsize(path) < 1_000_000
    docs = [json.loads(line)["text"] for line in open(path, encoding="utf-8")]
    assert len(docs) >= 500 and len(set(docs)) > 0.95 * len(docs)
    assert all(d.endswith((".", "\"")) for d in docs)


def test_fast_tar_reader_matches_webdataset_and_catches_truncated_streams(shards, tmp_path):
    m = read_manifest(str(shards))
    shard = shards / m.shards[0].name
    fast = list(iter_raw_samples(str(shard), reader="fast"))
    reference = list(iter_raw_samples(str(shard), reader="webdataset"))
    assert fast == reference and len(fast) == m.shards[0].samples
    cut = os.path.getsize(shard) // 2 + 100
    with pytest.raises(ShardError, match=r"corrupt or truncated tar after \d+ complete samples \(unexpected end"):
        list(iter_raw_samples(f"pipe:head -c {cut} {shard}", reader="fast"))
    copy = tmp_path / "x.tar"
    shutil.copy(shard, copy)
    with pytest.raises(ShardError, match=r"reading failed|cannot open"):
        list(iter_raw_samples(f"pipe:cat {tmp_path}/does-not-exist.tar"))
