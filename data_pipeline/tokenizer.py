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
import re
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


def token_byte_lengths(tokenizer: TextTokenizer) -> np.ndarray:
    """int64 array over token ids: how many UTF-8 bytes of text each id stands for; 0 for special/control ids.

    Why: a loss per token cannot be compared between runs with different tokenizers (a bigger vocabulary packs
    more text into a token, so its per-token loss is higher for the same model quality). Loss per *byte* of
    text can: validation bits per byte is ``sum(next-token loss in nats over targets with bytes > 0) /
    (ln 2 * sum(their byte lengths))``, nanochat's ``token_bytes`` idea. Special ids (bos, eos, pad, HF added
    special tokens, sentencepiece control/unknown pieces) stand for no text, weigh 0, and so drop out of both
    sums.

    The invariant: for text the tokenizer's normalizer leaves unchanged,
    ``token_byte_lengths(tok)[tok.encode_batch([text])[0]].sum() == len(text.encode("utf-8"))``. Byte-level
    tokens that hold part of a multi-byte character count their real bytes, never the 3 bytes of the U+FFFD
    that decoding the lone token would give. One exception, by design of those tokenizers: sentencepiece
    models (and HF metaspace tokenizers converted from them, LLaMA-2 style) prepend a "▁" to the text (the
    "dummy prefix"), a space that the text does not hold but the token does, counted as one byte: the sum is
    then one more than the text's bytes (sentencepiece adds it to every text when the model's
    add_dummy_prefix is set; HF's Metaspace pre-tokenizer not to a text that starts with a space). Bits per
    byte stays comparable: at most one byte more per encoded text.

    - HF byte-level BPE (GPT-2 / LLaMA-3 style, what `train_bpe` makes): each token string is mapped back
      through GPT-2's bytes<->unicode table; exact.
    - HF metaspace / sentencepiece-converted tokenizers: "▁" is one space byte, a byte-fallback token
      "<0xNN>" is one byte, anything else its UTF-8 length; exact (up to the dummy prefix).
    - HF tokenizers of any other scheme (e.g. WordPiece) and unknown `TextTokenizer` classes: the UTF-8
      length of decoding the lone token, which is APPROXIMATE (a decoder may drop or add spaces, e.g. WordPiece
      "##" continuations, and a partial character decodes to U+FFFD).
    - sentencepiece: control/unknown/unused pieces 0, byte pieces 1, others len(piece with "▁" as " ").

    Non-special HF added tokens count the UTF-8 length of their content (the raw text they match). Nothing is
    cached: the result is computed from the tokenizer each call (well under a second for a 128k vocabulary).
    """
    if isinstance(tokenizer, HFTokenizer):
        out = _hf_byte_lengths(tokenizer)
    elif isinstance(tokenizer, SentencePieceTokenizer):
        out = _sp_byte_lengths(tokenizer)
    else:
        out = np.array([len(tokenizer.decode([i]).encode("utf-8")) for i in range(tokenizer.vocab_size)],
                       dtype=np.int64)
    for tid in (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id):
        if tid is not None and 0 <= tid < len(out):
            out[tid] = 0
    return out


def _gpt2_bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table, the alphabet a byte-level BPE writes its token strings in.

    Printable Latin-1 bytes stand for themselves; the other 68 (control bytes, space, 0x7F-0xA0, 0xAD) are
    shifted to U+0100 onwards in byte order, so e.g. space is "Ġ" (U+0120) and newline "Ċ" (U+010A).
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    shifted = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + shifted)
            shifted += 1
    return table


_BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")


def _component_json(component: object) -> object:
    """A tokenizers component (normalizer, pre-tokenizer, decoder) as its JSON, without serialising the
    whole tokenizer (whose vocabulary and merges can be megabytes)."""
    if component is None:
        return None
    try:
        return json.loads(component.__getstate__())
    except (AttributeError, TypeError, ValueError):
        return None


def _walk(spec: object) -> Iterator[dict]:
    """Every JSON object in a component spec (a Sequence nests its parts)."""
    if isinstance(spec, dict):
        yield spec
        for v in spec.values():
            yield from _walk(v)
    elif isinstance(spec, list):
        for v in spec:
            yield from _walk(v)


def _hf_scheme(tok: object) -> str:
    """How an HF tokenizer's token strings spell the text's bytes: "bytelevel", "metaspace" or "unknown"."""
    parts = {name: list(_walk(_component_json(getattr(tok, name, None))))
             for name in ("normalizer", "pre_tokenizer", "decoder")}
    types = {name: {d.get("type") for d in objs} for name, objs in parts.items()}
    if any("ByteLevel" in t for t in types.values()):
        return "bytelevel"
    if "Metaspace" in types["pre_tokenizer"] or "Metaspace" in types["decoder"]:
        return "metaspace"
    # LLaMA-2's converted tokenizer.json: normalizer Replace(" " -> "▁"), decoder Replace("▁" -> " ").
    replaces = [(d.get("pattern", {}).get("String") if isinstance(d.get("pattern"), dict) else None,
                 d.get("content")) for name in ("normalizer", "decoder") for d in parts[name]
                if d.get("type") == "Replace"]
    if (" ", "▁") in replaces or ("▁", " ") in replaces:
        return "metaspace"
    return "unknown"


def _hf_byte_lengths(tokenizer: HFTokenizer) -> np.ndarray:
    tok = tokenizer._tok
    n = tokenizer.vocab_size
    out = np.zeros(n, dtype=np.int64)
    pieces = tok.get_vocab(with_added_tokens=False)  # token string -> id
    ids = np.fromiter(pieces.values(), dtype=np.int64, count=len(pieces))
    strings = list(pieces.keys())
    keep = ids < n
    scheme = _hf_scheme(tok)
    undecided: list[int] = []  # ids whose length comes from decoding (approximate)
    if scheme == "bytelevel":
        byte_of = {c: b for b, c in _gpt2_bytes_to_unicode().items()}
        to_latin1 = str.maketrans({c: chr(b) for c, b in byte_of.items()})
        if set("".join(strings)) <= byte_of.keys():  # the usual case: one C-speed pass, no per-token checks
            lengths = [len(s.translate(to_latin1).encode("latin-1")) for s in strings]
        else:
            lengths = []
            for tid, s in zip(ids.tolist(), strings):
                if set(s) <= byte_of.keys():
                    lengths.append(len(s.translate(to_latin1).encode("latin-1")))
                else:
                    lengths.append(0)
                    undecided.append(tid)
        out[ids[keep]] = np.asarray(lengths, dtype=np.int64)[keep]
    elif scheme == "metaspace":
        model = tok.model
        byte_fallback = bool(getattr(model, "byte_fallback", False)) or "ByteFallback" in {
            d.get("type") for d in _walk(_component_json(tok.decoder))}
        lengths = [1 if byte_fallback and _BYTE_PIECE.fullmatch(s) else len(s.replace("▁", " ").encode("utf-8"))
                   for s in strings]
        out[ids[keep]] = np.asarray(lengths, dtype=np.int64)[keep]
    else:
        undecided = ids[keep].tolist()
    if undecided:
        decoded = tok.decode_batch([[i] for i in undecided], skip_special_tokens=False)
        out[np.asarray(undecided, dtype=np.int64)] = [len(d.encode("utf-8")) for d in decoded]
    unk = getattr(tok.model, "unk_token", None)
    unk_id = tok.token_to_id(unk) if isinstance(unk, str) else None
    if unk_id is not None and unk_id < n:
        out[unk_id] = 0  # stands for whatever text it replaced: no fixed byte count
    for tid, added in tok.get_added_tokens_decoder().items():
        if tid < n:
            out[tid] = 0 if added.special else len(added.content.encode("utf-8"))  # matched as raw text
    return out


def _sp_byte_lengths(tokenizer: SentencePieceTokenizer) -> np.ndarray:
    sp = tokenizer._sp
    lengths = []
    for i in range(sp.get_piece_size()):
        if sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i):
            lengths.append(0)
        elif sp.is_byte(i):
            lengths.append(1)
        else:
            lengths.append(len(sp.id_to_piece(i).replace("▁", " ").encode("utf-8")))
    return np.asarray(lengths, dtype=np.int64)


def _atomic_write(path: str, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix=".tmp-")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)
