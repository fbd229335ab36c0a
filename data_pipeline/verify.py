"""`pretrain-data verify DIR`: prove a shard directory is what its manifest says, before a job burns GPU hours.

Checks, per shard: the file exists with the recorded size and sha256; every sample decodes (tar structure,
.npy arrays, ids < vocab, eos last); the sample and token counts match the manifest. Optionally that a given
tokenizer is the one the shards were made with. Every problem is one line naming the shard; the CLI exits 1 if
there is any.
"""
from __future__ import annotations

import glob
import hashlib
import os
from dataclasses import dataclass, field

from data_pipeline.errors import DataError
from data_pipeline.manifest import Manifest, check_tokenizer, read_manifest
from data_pipeline.shard_reader import decode_tokens, iter_raw_samples
from data_pipeline.shard_writer import TEMP_SUFFIX


@dataclass
class VerifyResult:
    manifest: Manifest
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    shards_ok: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems


def _sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def verify_shards(directory: str, tokenizer=None, *, checksums: bool = True) -> VerifyResult:
    """Check every shard of `directory` against its manifest; `tokenizer` (a TextTokenizer) optional."""
    manifest = read_manifest(directory)
    result = VerifyResult(manifest)
    if tokenizer is not None:
        try:
            check_tokenizer(manifest, tokenizer, where=directory)
        except DataError as e:
            result.problems.append(str(e))
    leftovers = glob.glob(os.path.join(directory, "*" + TEMP_SUFFIX))
    if leftovers:
        result.notes.append(f"{len(leftovers)} leftover temp file(s) from an interrupted run, e.g. "
                            f"{os.path.basename(leftovers[0])} (not part of the dataset; safe to delete)")
    vocab, eos = manifest.vocab_size, manifest.eos_id
    for shard in manifest.shards:
        path = os.path.join(directory, shard.name)
        if not os.path.exists(path):
            result.problems.append(f"{shard.name}: missing (listed in manifest.json)")
            continue
        size = os.path.getsize(path)
        if size != shard.bytes:
            result.problems.append(f"{shard.name}: {size} bytes on disk, manifest says {shard.bytes} "
                                   "(truncated or replaced)")
            continue
        if checksums and _sha256(path) != shard.sha256:
            result.problems.append(f"{shard.name}: sha256 mismatch (file changed since prepare: corrupt copy?)")
            continue
        try:
            samples = tokens = 0
            for key, parts in iter_raw_samples(path, shard.name, reader="webdataset"):
                where = f"{shard.name}:{key}"
                arr = decode_tokens(parts.get("tokens.npy"), where)
                if arr.dtype.name != manifest.dtype:
                    raise DataError(f"{where}: dtype {arr.dtype} but manifest says {manifest.dtype}")
                if len(arr) == 0 or int(arr[-1]) != eos:
                    raise DataError(f"{where}: document does not end with eos id {eos}")
                if int(arr.max()) >= vocab:
                    raise DataError(f"{where}: token id {int(arr.max())} >= vocab size {vocab}")
                samples += 1
                tokens += len(arr)
            if (samples, tokens) != (shard.samples, shard.tokens):
                raise DataError(f"{shard.name}: {samples} samples / {tokens} tokens, manifest says "
                                f"{shard.samples} / {shard.tokens} (corrupt tar header or truncated file: Python's tar reader "
                                "stops silently at a damaged header)")
        except DataError as e:
            result.problems.append(str(e))
            continue
        result.shards_ok += 1
    return result
