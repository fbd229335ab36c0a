"""Tokenizers: train a byte-level BPE (HF `tokenizers`), or load a `tokenizer.json` / sentencepiece `.model`.

One thin interface, `TextTokenizer`, so the rest of the pipeline does not care which library is underneath:
`encode_batch` runs the library's batch encoder (Rust / C++), never a Python loop over tokens.

`identity` is a hash of what decides token ids (vocabulary, merges, added tokens, normalizer and
pre-tokenizer), not of the file's bytes: re-saving the same tokenizer keeps its identity, while any change that
would give different ids changes it. The manifest records it so shards and model can be checked against the
tokenizer they were made with.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from typing import Iterable, Iterator, Protocol

import numpy as np

from data_pipeline.errors import TokenizerError

# LLaMA-3-style names. They are registered as special tokens, and documents are encoded with
# `encode_special_tokens=True`, so a document that contains the literal text "<|end_of_text|>" is encoded as
# ordinary text and can never inject an eos id.
BOS, EOS, PAD = "<|begin_of_text|>", "<|end_of_text|>", "<|pad|>"
_BOS_NAMES = (BOS, "<s>", "<|bos|>", "<bos>", "[BOS]")
_EOS_NAMES = (EOS, "</s>", "<|endoftext|>", "<|eos|>", "<eos>", "[EOS]", "<|eot_id|>")
_PAD_NAMES = (PAD, "<pad>", "<|padding|>", "[PAD]")


class TextTokenizer(Protocol):
    kind: str          # "hf" or "sentencepiece"
    path: str          # what it was loaded from
    identity: str      # sha256 hex of what decides token ids
    vocab_size: int    # including special tokens
    bos_id: int | None
    eos_id: int
    pad_id: int | None

    def encode_batch(self, texts: list[str]) -> list[list[int]]: ...
    def decode(self, ids: Iterable[int]) -> str: ...


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 halves the shard size whenever every id fits in it."""
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


class HFTokenizer:
    """A `tokenizers.Tokenizer` from a `tokenizer.json` (file or the directory holding it)."""

    kind = "hf"

    def __init__(self, path: str):
        from tokenizers import Tokenizer

        file = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
        try:
            with open(file, encoding="utf-8") as f:
                raw = f.read()
            self._tok = Tokenizer.from_str(raw)
        except (OSError, Exception) as e:  # tokenizers raises its own Exception type on bad JSON
            raise TokenizerError(f"{file}: cannot load tokenizer ({e})") from None
        self.path = path
        spec = json.loads(raw)
        ids_decide = {k: spec.get(k) for k in ("model", "added_tokens", "normalizer", "pre_tokenizer")}
        self.identity = hashlib.sha256(json.dumps(ids_decide, sort_keys=True).encode()).hexdigest()
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        config = _read_tokenizer_config(os.path.dirname(file))
        self.bos_id = self._find(config.get("bos_token"), _BOS_NAMES)
        self.eos_id = self._find(config.get("eos_token"), _EOS_NAMES)
        self.pad_id = self._find(config.get("pad_token"), _PAD_NAMES)
        if self.eos_id is None:
            raise TokenizerError(f"{file}: no end-of-text token (looked for {', '.join(_EOS_NAMES)}); documents "
                                 "are separated by eos when packed, so the tokenizer needs one")
        self._tok.encode_special_tokens = True  # literal special-token text in a document stays text

    def _find(self, configured: object, names: tuple[str, ...]) -> int | None:
        if isinstance(configured, dict):
            configured = configured.get("content")
        for name in ((configured,) if isinstance(configured, str) else ()) + names:
            tid = self._tok.token_to_id(name)
            if tid is not None:
                return tid
        return None

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        # encode_batch_fast skips offset tracking; both run in Rust and release the GIL.
        return [e.ids for e in self._tok.encode_batch_fast(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)


def _read_tokenizer_config(directory: str) -> dict:
    try:
        with open(os.path.join(directory, "tokenizer_config.json"), encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


class SentencePieceTokenizer:
    """A sentencepiece `.model` file (e.g. LLaMA-1/2's tokenizer.model)."""

    kind = "sentencepiece"

    def __init__(self, path: str):
        import sentencepiece as spm

        try:
            self._sp = spm.SentencePieceProcessor(model_file=path)
        except (OSError, RuntimeError) as e:
            raise TokenizerError(f"{path}: cannot load sentencepiece model ({e})") from None
        self.path = path
        self.identity = hashlib.sha256(self._sp.serialized_model_proto()).hexdigest()
        self.vocab_size = self._sp.get_piece_size()
        self.bos_id = self._sp.bos_id() if self._sp.bos_id() >= 0 else None
        self.eos_id = self._sp.eos_id()
        self.pad_id = self._sp.pad_id() if self._sp.pad_id() >= 0 else None
        if self.eos_id < 0:
            raise TokenizerError(f"{path}: sentencepiece model has no eos id")

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self._sp.encode(texts, out_type=int)  # C++ loop over the batch

    def decode(self, ids: Iterable[int]) -> str:
        return self._sp.decode([int(i) for i in ids])


# A tokenizer directory's own files (transformers' names): what a checkpoint, an export and an import copy of it.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "tokenizer.model", "chat_template.jinja")


def tokenizer_files(src: str) -> list[str]:
    """The files that make up the tokenizer at `src` (a file, or a directory: its TOKENIZER_FILES and
    sentencepiece `.model` files, not whatever else lives there, e.g. a model's config.json or weights);
    TokenizerError naming `src` when it is not there."""
    if os.path.isfile(src):
        return [src]
    if not os.path.isdir(src):
        raise TokenizerError(f"{src}: no such tokenizer file or directory")
    return [os.path.join(src, n) for n in sorted(os.listdir(src))
            if os.path.isfile(os.path.join(src, n)) and (n in TOKENIZER_FILES or n.endswith(".model"))]


def load_tokenizer(path: str) -> TextTokenizer:
    """A directory or file holding `tokenizer.json`, or a sentencepiece `.model` file."""
    if path.endswith(".model"):
        return SentencePieceTokenizer(path)
    if os.path.isdir(path) and not os.path.exists(os.path.join(path, "tokenizer.json")):
        models = [n for n in os.listdir(path) if n.endswith(".model")]
        if len(models) == 1:
            return SentencePieceTokenizer(os.path.join(path, models[0]))
        raise TokenizerError(f"{path}: no tokenizer.json (or a single sentencepiece .model) in this directory")
    if not os.path.exists(path):
        raise TokenizerError(f"{path}: no such tokenizer file or directory")
    return HFTokenizer(path)


def train_bpe(texts: Iterable[str], vocab_size: int, out_dir: str, *, min_frequency: int = 2,
              show_progress: bool = True) -> HFTokenizer:
    """Train a byte-level BPE with bos/eos/pad special tokens and save `out_dir/tokenizer.json`.

    Byte-level means every string, in any script, round-trips exactly (no unknown token): the shards can be
    decoded back to the original documents, which the round-trip test relies on.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < 256 + 3:
        raise TokenizerError(f"--vocab-size {vocab_size} is too small: a byte-level BPE needs at least 259 "
                             "(256 bytes + bos/eos/pad)")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                  special_tokens=[BOS, EOS, PAD], show_progress=show_progress,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    seen = [0]

    def counted(items: Iterable[str]) -> Iterator[str]:
        for text in items:
            seen[0] += bool(text)
            yield text

    tok.train_from_iterator(counted(texts), trainer=trainer)
    if not seen[0]:
        raise TokenizerError("the input holds no text to train a tokenizer on (0 non-empty documents)")
    os.makedirs(out_dir, exist_ok=True)
    config = {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD, "tokenizer_class": "PreTrainedTokenizerFast"}
    _atomic_write(os.path.join(out_dir, "tokenizer_config.json"), json.dumps(config, indent=2))
    _atomic_write(os.path.join(out_dir, "tokenizer.json"), tok.to_str(pretty=True))
    return HFTokenizer(out_dir)


def _atomic_write(path: str, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix=".tmp-")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)
