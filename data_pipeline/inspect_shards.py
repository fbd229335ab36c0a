"""`pretrain-data inspect DIR`: what is in a shard directory, and what a few samples decode to."""
from __future__ import annotations

import os

from data_pipeline.errors import DataError
from data_pipeline.manifest import check_tokenizer, read_manifest
from data_pipeline.shard_reader import decode_tokens, iter_raw_samples
from data_pipeline.tokenizer import load_tokenizer


def describe(directory: str, tokenizer_path: str | None = None, samples: int = 3, chars: int = 300) -> str:
    """A human summary: totals, tokenizer, shards, and the first `samples` documents decoded.

    The tokenizer defaults to the one recorded in the manifest when it still exists and still matches.
    """
    m = read_manifest(directory)
    lines = [
        f"{directory}: {len(m.shards)} shards, {m.total_samples:,} documents, {m.total_tokens:,} tokens "
        f"({m.total_tokens / max(m.total_samples, 1):,.1f} tokens/doc), dtype {m.dtype}",
        f"tokenizer: {m.tokenizer.kind} vocab {m.vocab_size} eos {m.eos_id} bos {m.bos_id} pad {m.pad_id} "
        f"hash {m.tokenizer_hash[:12]} (made from {m.tokenizer.path or '?'})",
        f"made by: {' '.join(m.command)}  at {m.created}",
    ]
    if m.skipped:
        lines.append("skipped documents: " + ", ".join(f"{n} {r}" for r, n in sorted(m.skipped.items())))
    for s in m.shards[:10]:
        lines.append(f"  {s.name}: {s.samples:,} docs {s.tokens:,} tokens {s.bytes / 1e6:.1f} MB sha256 {s.sha256[:12]}")
    if len(m.shards) > 10:
        lines.append(f"  ... {len(m.shards) - 10} more shards")
    tok = None
    if tokenizer_path:
        tok = load_tokenizer(tokenizer_path)
        check_tokenizer(m, tok, where=directory)
    elif m.tokenizer.path and os.path.exists(m.tokenizer.path):
        try:
            tok = load_tokenizer(m.tokenizer.path)
            check_tokenizer(m, tok, where=directory)
        except DataError:
            tok = None
            lines.append(f"(tokenizer at {m.tokenizer.path} no longer matches; pass --tokenizer to decode)")
    shown = 0
    for shard in m.shards:
        if shown >= samples:
            break
        for key, parts in iter_raw_samples(os.path.join(directory, shard.name), shard.name, reader="webdataset"):
            arr = decode_tokens(parts.get("tokens.npy"), f"{shard.name}:{key}")
            source = parts.get("source.txt", b"?").decode("utf-8", "replace")
            lines.append(f"--- {shard.name} key {key} from {source}: {len(arr)} tokens")
            if tok is not None:
                text = tok.decode(arr)
                lines.append(repr(text[:chars]) + (" ..." if len(text) > chars else ""))
            else:
                lines.append(str(arr[:32].tolist()) + (" ..." if len(arr) > 32 else ""))
            shown += 1
            if shown >= samples:
                break
    return "\n".join(lines)
