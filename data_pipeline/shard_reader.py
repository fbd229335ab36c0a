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

Given the shard's manifest entry (`expect=`), the reader also checks that the shard is the one the manifest
vouches for, in the same single pass: every byte read is hashed (sha256) on its way to the parser, the stream
is read to its very end (past the tar end blocks), and there the sample count and the digest must match the
entry, else a one-line ShardMismatchError naming the shard. Nothing is read twice.
"""
from __future__ import annotations

import hashlib
import io
import re
import tarfile
import zlib
from typing import Iterator

import numpy as np
from webdataset.gopen import gopen
from webdataset.tariterators import tar_file_iterator

from data_pipeline.errors import ShardError, ShardMismatchError
from data_pipeline.manifest import ShardInfo

_CHUNK = 1 << 20  # bytes per read from the file or pipe (and per hash update)


def _split_name(fname: str) -> tuple[str, str]:
    """'000000000012.tokens.npy' -> ('000000000012', 'tokens.npy'), webdataset's rule (first dot of basename)."""
    slash = fname.rfind("/")
    dot = fname.find(".", slash + 1)
    return (fname, "") if dot < 0 else (fname[:dot], fname[dot + 1:])


class _TarFormatError(ValueError):
    pass


def _header_checksum(header: bytes) -> int:
    """The ustar checksum: the sum of the header's bytes, its checksum field counted as 8 spaces.

    Summed with adler32, whose first half is 1 + the byte sum mod 65521: exact for 256 bytes (at most
    65280), and ~5x faster than `sum()` over a bytes object, which was a fifth of the loader's time."""
    low = (zlib.adler32(header[:256]) & 0xFFFF) - 1
    high = (zlib.adler32(header[256:512]) & 0xFFFF) - 1
    return low + high - sum(header[148:156]) + 256


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
        if stored != _header_checksum(header):
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


class _HashingRaw(io.RawIOBase):
    """A raw stream that hashes (sha256) and counts every byte it passes on, in order.

    A BufferedReader on top of it serves the parser's small reads (512-byte headers, member data) from chunks
    of _CHUNK bytes, so the hash is updated once per chunk, not per read. (Hashing each chunk on a side thread
    while the parser reads on measured no faster on 2 cores: the hand-offs cost what the overlap saves.)"""

    def __init__(self, source):
        super().__init__()
        self.source = source
        self.sha256 = hashlib.sha256()
        self.size = 0
        self._readinto = getattr(source, "readinto", None)  # a local file's FileIO; a pipe: only read()

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        if self._readinto is not None:
            n = self._readinto(buffer) or 0
            view = memoryview(buffer)[:n]
        else:
            data = self.source.read(len(buffer))
            n = len(data)
            buffer[:n] = data
            view = data
        self.sha256.update(view)
        self.size += n
        return n


def _open(url: str, raw: bool = False):
    """The shard's byte stream: a local file (unbuffered with raw=True), else webdataset's gopen (pipe:, ...)."""
    if "://" not in url and not url.startswith("pipe:"):
        return open(url, "rb", buffering=0 if raw else _CHUNK)
    return gopen(url, "rb")


def _drain(stream) -> None:
    """Read to the end of the stream: the bytes after the tar end marker (padding) are part of the hash too."""
    while stream.read(_CHUNK):
        pass


def _check_end(name: str, expect: ShardInfo, samples: int, hashing: _HashingRaw) -> None:
    """The whole shard has been read: its sample count and sha256 must be what the manifest says."""
    if samples != expect.samples:
        raise ShardMismatchError(f"{name}: holds {samples} samples, its manifest entry says {expect.samples} "
                                 "(manifest.json edited, or the shard replaced: run `pretrain-data verify`)")
    digest = hashing.sha256.hexdigest()
    if digest != expect.sha256:
        raise ShardMismatchError(f"{name}: sha256 {digest[:16]}... of its {hashing.size} bytes differs from its "
                                 f"manifest entry's {expect.sha256[:16]}... (changed since prepare: corrupt copy? "
                                 "run `pretrain-data verify`)")


def iter_raw_samples(url: str, name: str | None = None, reader: str = "fast",
                     expect: ShardInfo | None = None) -> Iterator[tuple[str, dict]]:
    """Yield (key, {extension: bytes}) for each sample in the shard, in tar order.

    With `expect` (the shard's manifest entry), once the last sample is yielded the stream is read to its end
    and a ShardMismatchError raised if its sample count or sha256 differ from the entry. A consumer that stops
    early (closes the generator) gets no check: only a shard read to its end can be vouched for.
    """
    name = name or url
    count = 0
    try:
        source = _open(url, raw=expect is not None)
    except (OSError, ValueError) as e:
        raise ShardError(f"{name}: cannot open ({e})") from None
    hashing = None if expect is None else _HashingRaw(source)
    stream = source if hashing is None else io.BufferedReader(hashing, _CHUNK)
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
        if hashing is not None:
            _drain(stream)
        complete = True
    except (tarfile.TarError, EOFError, OSError, ValueError) as e:
        failed = _close(source)  # a pipe: command that failed explains an unreadable stream best
        if failed:
            raise ShardError(f"{name}: reading failed ({failed})") from None
        reason = " ".join(str(e).split(" @ ")[0].split()) or type(e).__name__
        raise ShardError(f"{name}: corrupt or truncated tar after {count} complete samples ({reason})") from None
    finally:
        failed = _close(source)
        if complete and failed:
            raise ShardError(f"{name}: reading failed ({failed})")
        # not complete: the consumer stopped early (a pipe then dies of SIGPIPE, which is not an error)
    if hashing is not None:
        _check_end(name, expect, count, hashing)


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
