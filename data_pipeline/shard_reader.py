"""Read samples back from one `.tar` shard (a local path or a webdataset `pipe:` URL), raw or decoded.

Built on webdataset's `gopen` (local files, `pipe:` commands) and `tar_file_iterator`; grouping members into
samples is done here because the loader must be able to *skip* a sample without decoding it (resume, and
splitting a shard between workers). Any tar-level failure becomes one ShardError naming the shard and how many
samples were read before it.
"""
from __future__ import annotations

import io
import re
import tarfile
from typing import Iterator

import numpy as np
from webdataset.gopen import gopen
from webdataset.tariterators import tar_file_iterator

from data_pipeline.errors import ShardError


def _split_name(fname: str) -> tuple[str, str]:
    """'000000000012.tokens.npy' -> ('000000000012', 'tokens.npy'), webdataset's rule (first dot of basename)."""
    slash = fname.rfind("/")
    dot = fname.find(".", slash + 1)
    return (fname, "") if dot < 0 else (fname[:dot], fname[dot + 1:])


def iter_raw_samples(url: str, name: str | None = None) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Yield (key, {extension: bytes}) for each sample in the shard, in tar order."""
    name = name or url
    count = 0
    try:
        stream = gopen(url, "rb")
    except (OSError, ValueError) as e:
        raise ShardError(f"{name}: cannot open ({e})") from None
    key, parts = None, {}
    complete = False
    try:
        for member in tar_file_iterator(stream):
            k, ext = _split_name(member["fname"])
            if k != key:
                if key is not None:
                    yield key, parts
                    count += 1
                key, parts = k, {}
            parts[ext] = member["data"]
        if key is not None:
            yield key, parts
            count += 1
        complete = True
    except (tarfile.TarError, EOFError, OSError, ValueError) as e:
        failed = _close(stream)  # a pipe: command that failed explains an unreadable stream best
        if failed:
            raise ShardError(f"{name}: reading failed ({failed})") from None
        reason = " ".join(str(e).split(" @ ")[0].split()) or type(e).__name__
        raise ShardError(f"{name}: corrupt or truncated tar after {count} samples ({reason})") from None
    finally:
        failed = _close(stream)
        if complete and failed:
            raise ShardError(f"{name}: reading failed ({failed})")
        # not complete: the consumer stopped early (a pipe then dies of SIGPIPE, which is not an error)


def _close(stream) -> str | None:
    """Close; return why the producer failed (webdataset's Pipe raises on a bad exit status), else None."""
    try:
        stream.close()
    except Exception as e:  # noqa: BLE001 - Pipe raises a plain IOError/Exception with the command in it
        return " ".join(str(e).split())
    return None


_NPY_HEADER = re.compile(rb"\{'descr': '([<>|]u[1248])', 'fortran_order': False, 'shape': \((\d+),\), \}")


def decode_tokens(blob: bytes | None, where: str) -> np.ndarray:
    """The `tokens.npy` member -> 1-D unsigned integer array; never unpickles.

    Fast path: the header `np.save` writes for a 1-D array is matched with a regex (np.load spends ~80 us
    per array in `ast.literal_eval` on it, which alone would cap the loader near 1M tokens/s on short
    documents); anything else goes through np.load.
    """
    if blob is None:
        raise ShardError(f"{where}: sample has no tokens.npy")
    if blob[:8] == b"\x93NUMPY\x01\x00" and len(blob) >= 10:
        header_len = int.from_bytes(blob[8:10], "little")
        m = _NPY_HEADER.match(blob, 10, 10 + header_len)
        if m is not None:
            dtype = np.dtype(m.group(1).decode())
            n = int(m.group(2))
            if len(blob) - 10 - header_len != n * dtype.itemsize:
                raise ShardError(f"{where}: tokens.npy is truncated ({len(blob)} bytes for {n} tokens)")
            return np.frombuffer(blob, dtype=dtype, count=n, offset=10 + header_len)
    try:
        arr = np.load(io.BytesIO(blob), allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise ShardError(f"{where}: tokens.npy is not a valid .npy array ({e})") from None
    if arr.ndim != 1 or arr.dtype.kind != "u":
        raise ShardError(f"{where}: tokens.npy has shape {arr.shape} dtype {arr.dtype}, expected 1-D unsigned")
    return arr
