"""token_byte_lengths: the byte count behind each token id, which validation bits-per-byte divides by.

Bits per byte is only comparable across tokenizers if the byte counts are exact, so these tests train real
tokenizers (the project's byte-level BPE, and a sentencepiece model with byte fallback) and check that the
lengths of a text's token ids add up to the text's UTF-8 bytes, including for tokens that hold part of a
multi-byte character (where decoding the lone token gives U+FFFD, 3 bytes, whatever the token holds).
"""
from __future__ import annotations

import random

import numpy as np
import pytest
from dp_helpers import SPECIAL_DOCS, make_docs

from data_pipeline.tokenizer import _gpt2_bytes_to_unicode, load_tokenizer, token_byte_lengths, train_bpe

NON_ASCII = ["naïve café 東京 emoji 🙂", "Ünïcödé — naïve café, 日本語のテキスト, русский текст, العربية, emoji 🦙🚀",
             "東京の天気は晴れ 🙂🙂 café au lait", "Zürich, Kraków, São Paulo, Αθήνα, 서울, Москва"]
# Texts to check the sums on: ASCII, whitespace at the edges, CRLF/tabs, the literal eos text (ordinary text
# here), non-ASCII seen in training, and characters never seen in training (byte-level / byte fallback only).
TEXTS = ["the river and the bridge", "  leading and trailing spaces  ", "line one\nline two\r\nline three\ttab",
         "this document mentions <|end_of_text|> literally", *NON_ASCII, "ẞ𝔘𝔫𝔦 ∮ ⅋ 🧬 ꙮ", "🙂", "a"]


def _training_lines(n: int = 300) -> list[str]:
    """A few hundred short lines, many of them non-ASCII, so BPE merges bytes inside multi-byte characters."""
    rng = random.Random(7)
    docs = make_docs(n // 2, seed=11) + SPECIAL_DOCS
    while len(docs) < n:
        docs.append(" ".join(rng.choice(NON_ASCII).split()[: rng.randint(2, 8)]))
    return docs


def _byte_sums(tok, lengths: np.ndarray) -> list[tuple[int, int]]:
    """(sum of token byte lengths, UTF-8 bytes of the text) for every text in TEXTS."""
    return [(int(lengths[np.asarray(ids, dtype=np.int64)].sum()), len(text.encode("utf-8")))
            for text, ids in zip(TEXTS, tok.encode_batch(TEXTS))]


def test_byte_level_bpe_lengths_sum_to_the_texts_utf8_bytes(tmp_path):
    from tokenizers import pre_tokenizers

    table = _gpt2_bytes_to_unicode()  # the hand-written table is the library's byte-level alphabet
    assert sorted(table.values()) == sorted(pre_tokenizers.ByteLevel.alphabet()) and table[32] + table[10] == "ĠĊ"
    tok = train_bpe(_training_lines(), 600, str(tmp_path / "tok"), show_progress=False)
    lengths = token_byte_lengths(tok)
    assert lengths.dtype == np.int64 and lengths.shape == (tok.vocab_size,)
    assert lengths[tok.eos_id] == 0 and lengths[tok.bos_id] == 0 and lengths[tok.pad_id] == 0
    assert (lengths > 0).sum() == tok.vocab_size - 3  # every other id is text
    sums = _byte_sums(tok, lengths)
    assert [s for s, _ in sums] == [b for _, b in sums], list(zip(TEXTS, sums))
    # The test means something: some tokens of the non-ASCII texts are part of a character, and for them the
    # naive length of the decoded lone token is wrong (a 3-byte U+FFFD).
    ids = sorted({i for text_ids in tok.encode_batch(NON_ASCII) for i in text_ids})
    partial = [i for i in ids if "\ufffd" in tok.decode([i])]
    assert partial, "no partial-UTF-8 token in the non-ASCII texts: train on more of them"
    assert any(lengths[i] != len(tok.decode([i]).encode("utf-8")) for i in partial)
    assert all(1 <= lengths[i] <= 3 for i in partial)


@pytest.mark.parametrize("dummy_prefix", [True, False])
def test_sentencepiece_lengths_sum_to_the_texts_utf8_bytes_plus_the_dummy_prefix(tmp_path, dummy_prefix):
    import sentencepiece as spm

    corpus = tmp_path / "train.txt"
    corpus.write_text("\n".join(line.replace("\n", " ") for line in _training_lines()), encoding="utf-8")
    # LLaMA's settings: byte fallback, no normalisation, whitespace kept as is (so the texts round-trip).
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / "sp"), vocab_size=300,
                                   model_type="bpe", byte_fallback=True, character_coverage=0.98,
                                   normalization_rule_name="identity", remove_extra_whitespaces=False,
                                   add_dummy_prefix=dummy_prefix, unk_id=0, bos_id=1, eos_id=2, pad_id=3,
                                   minloglevel=2)
    tok = load_tokenizer(str(tmp_path / "sp.model"))
    lengths = token_byte_lengths(tok)
    assert lengths.dtype == np.int64 and lengths.shape == (tok.vocab_size,) == (300,)
    assert lengths[[0, 1, 2, 3]].tolist() == [0, 0, 0, 0]  # unk, bos, eos, pad
    assert lengths[tok._sp.piece_to_id("<0x0A>")] == 1 and lengths[tok._sp.piece_to_id("<0xF0>")] == 1
    pieces = {tok._sp.id_to_piece(i) for ids in tok.encode_batch(NON_ASCII) for i in ids}
    assert "<0xE6>" in pieces and "é" in pieces  # both byte-fallback pieces and multi-byte character pieces
    for text, (got, nbytes) in zip(TEXTS, _byte_sums(tok, lengths)):
        # The dummy prefix: sentencepiece prepends one "▁" (a space byte) to every text.
        assert got == nbytes + dummy_prefix, (text, got, nbytes)
