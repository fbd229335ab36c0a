"""Read samples back from one `.tar` shard (a local path or a webdataset `pipe:` URL), raw or decoded.

Streams are opened with webdataset's `gopen` (so `pipe:`, `http(s):` etc. work as in webdataset). Two member
readers:
- `reader="webdataset"`: webdataset's `tar_file_iterator` (Python's tarfile), used by `verify`/`inspect` so they
  check exactly what a plain webdataset consumer sees;
- `reader="fast"` (the loader): a direct ustar header parser. Python's tarfile costs ~40 us per member, which
  capped the loader near 5M tokens/s on ~500-token documents; this one is a few us. It also checks every
  header's checksum and raises on a damaged header, where tarfile silently ends the stream there.
Grouping members into samples is done here because the loader must be able to *skip* a sample without
decoding it (resume, and splitting a shard between workers). Any tar-level failure becomes one ShardError
naming the shard and how many samples were read before it.
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


class _TarFormatError(ValueError):
    pass


def _fast_members(stream) -> Iterator[dict]:
    """Regular-file members of a tar stream as {"fname", "data"} (same shape as webdataset's iterator)."""
    read = stream.read
    long_name = None
    while True:
        header = read(512)
        if len(header) < 512:
            if not header:
                return  # EOF at a block boundary without end blocks: accept (some writers omit them)
            raise _TarFormatError(f"unexpected end of data in a header ({len(header)} of 512 bytes)")
        if header == b"\0" * 512:
            return  # end-of-archive marker
        try:
            stored = int(header[148:156].strip(b"\0 ") or b"0", 8)
            size_field = header[124:136]
            size = (int.from_bytes(size_field[1:], "big") if size_field[0] & 0x80
                    else int(size_field.strip(b"\0 ") or b"0", 8))
        except ValueError:
            raise _TarFormatError("damaged header (non-numeric size or checksum field)") from None
        if stored != sum(header[:148]) + 256 + sum(header[156:]):
            raise _TarFormatError("damaged header (checksum mismatch)")
        data = read(size)
        if len(data) < size:
            raise _TarFormatError(f"unexpected end of data ({len(data)} of {size} bytes)")
        if size % 512:
            read(512 - size % 512)
        kind = header[156:157]
        if kind == b"L":  # GNU long name for the next member
            long_name = data.rstrip(b"\0").decode("utf-8")
            continue
        if kind == b"x":  # PAX extended header: only "path" matters here
            for record in data.split(b"\n"):
                if b" path=" in record:
                    long_name = record.split(b" path=", 1)[1].decode("utf-8")
            continue
        if kind not in (b"0", b"\0"):
            long_name = None
            continue  # directories, links, global headers: not sample members
        name = long_name
        if name is None:
            name = header[:100].split(b"\0", 1)[0].decode("utf-8")
            prefix = header[345:500].split(b"\0", 1)[0] if header[257:262] == b"ustar" else b""
            if prefix:
                name = prefix.decode("utf-8") + "/" + name
        long_name = None
        if name.startswith("__") or "/__" in name:
            continue  # webdataset's rule: __meta__-style members are not sample data
        yield {"fname": name, "data": data}


def _open(url: str):
    if "://" not in url and not url.startswith("pipe:"):
        return open(url, "rb", buffering=1 << 20)
    return gopen(url, "rb")


def iter_raw_samples(url: str, name: str | None = None, reader: str = "fast") -> Iterator[tuple[str, dict]]:
    """Yield (key, {extension: bytes}) for each sample in the shard, in tar order."""
    name = name or url
    count = 0
    try:
        stream = _open(url)
    except (OSError, ValueError) as e:
        raise ShardError(f"{name}: cannot open ({e})") from None
    key, parts = None, {}
    complete = False
    members = _fast_members(stream) if reader == "fast" else tar_file_iterator(stream)
    try:
        for member in members:
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
        raise ShardError(f"{name}: corrupt or truncated tar after {count} complete samples ({reason})") from None
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
