"""Token samples -> webdataset `.tar` shards of bounded size, each written under a temp name and renamed.

A sample is what a plain `webdataset.WebDataset(urls).decode()` reads without our code:
`__key__` (the document's global index, 12 digits), `tokens.npy` (a 1-D uint16/uint32 numpy array, eos last)
and `source.txt` (where the document came from, e.g. "corpus/a.jsonl:123").

The sha256 is computed while writing (no second read of the file), and a shard reaches its final name only
after it is complete and fsynced: an interrupted `prepare` leaves at most a `*.tar.tmp` file behind.
"""
from __future__ import annotations

import hashlib
import io
import os

import numpy as np
import webdataset as wds

from data_pipeline.manifest import ShardInfo

SHARD_PATTERN = "shard-{index:06d}.tar"
TEMP_SUFFIX = ".tmp"
FIXED_MTIME = 0  # int: a float mtime makes tarfile add a PAX header per member. The same documents always give byte-identical shards (and the same sha256)


def npy_bytes(tokens: np.ndarray) -> bytes:
    """Serialise a 1-D token array as a .npy file (what `np.load` and webdataset's decoder read)."""
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.ascontiguousarray(tokens), allow_pickle=False)
    return buf.getvalue()


class _HashingFile:
    """Write-only file wrapper: hash and count the bytes on their way to disk."""

    def __init__(self, f):
        self._f = f
        self.sha256 = hashlib.sha256()
        self.size = 0

    def write(self, data) -> int:
        self.sha256.update(data)
        self.size += len(data)
        return self._f.write(data)

    def flush(self) -> None:
        self._f.flush()


class ShardSetWriter:
    """Appends samples to `shard-000000.tar`, `shard-000001.tar`, ... starting a new shard past `max_bytes`."""

    def __init__(self, directory: str, max_bytes: int):
        self.directory = directory
        self.max_bytes = max_bytes
        self.shards: list[ShardInfo] = []
        self._file = None
        self._hashing: _HashingFile | None = None
        self._tar: wds.TarWriter | None = None
        self._samples = 0
        self._tokens = 0

    def _open(self) -> None:
        name = SHARD_PATTERN.format(index=len(self.shards))
        self._tmp_path = os.path.join(self.directory, name + TEMP_SUFFIX)
        self._final_path = os.path.join(self.directory, name)
        self._name = name
        self._file = open(self._tmp_path, "wb")
        self._hashing = _HashingFile(self._file)
        self._tar = wds.TarWriter(self._hashing, encoder=False, mtime=FIXED_MTIME)
        self._samples = self._tokens = 0

    def write(self, key: str, tokens_npy: bytes, num_tokens: int, source_id: str) -> None:
        """Add one document (`tokens_npy` from `npy_bytes`)."""
        if self._tar is None:
            self._open()
        self._tar.write({"__key__": key, "tokens.npy": tokens_npy, "source.txt": source_id.encode("utf-8")})
        self._samples += 1
        self._tokens += num_tokens
        if self._hashing.size >= self.max_bytes:
            self._finish()

    def _finish(self) -> None:
        self._tar.close()  # writes the end-of-archive blocks through the hashing wrapper
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self._tmp_path, self._final_path)
        self.shards.append(ShardInfo(name=self._name, samples=self._samples, tokens=self._tokens,
                                     bytes=self._hashing.size, sha256=self._hashing.sha256.hexdigest()))
        self._tar = self._file = self._hashing = None

    def close(self) -> list[ShardInfo]:
        """Finish the open shard; returns every shard written."""
        if self._tar is not None:
            self._finish()
        return self.shards

    def abort(self) -> None:
        """Remove the incomplete shard (completed shards stay; without a manifest they are not a dataset)."""
        if self._file is not None:
            # Tell tarfile its stream is done, or its __del__ would write end blocks into a closed file.
            tar = self._tar.tarstream
            tar.closed = True
            if getattr(tar, "fileobj", None) is not None:
                tar.fileobj.closed = True
            self._file.close()
            if os.path.exists(self._tmp_path):
                os.remove(self._tmp_path)
            self._tar = self._file = self._hashing = None
