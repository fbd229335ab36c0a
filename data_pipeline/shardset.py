"""A loader source string -> the manifest and the shard URLs it names.

Accepted: a shard directory (all shards of its manifest.json); a local glob or brace pattern of `.tar` files
(`shards/shard-{000000..000009}.tar`, a subset is fine); a webdataset `pipe:` URL, brace-expanded
(`pipe:aws s3 cp s3://b/shards/shard-{000000..000099}.tar -`), or another URL webdataset's gopen opens
(http(s)://...). For a URL the manifest is read the same way with the shard's file name replaced by
`manifest.json`. A manifest is always required: its
per-shard sample counts are what lets every rank and worker compute its exact share of an epoch.
"""
from __future__ import annotations

import glob
import hashlib
import os
import re
from dataclasses import dataclass

import braceexpand

from data_pipeline.errors import DataError, ManifestError, ShardError
from data_pipeline.manifest import MANIFEST_NAME, Manifest, ShardInfo, parse_manifest, read_manifest

_TAR_NAME = re.compile(r"[^/\s'\"]+\.tar")


@dataclass(frozen=True)
class ShardSet:
    spec: str                       # what the user passed
    manifest: Manifest
    urls: tuple[str, ...]           # path or pipe: URL of each shard, in manifest order
    shards: tuple[ShardInfo, ...]   # the manifest entry of each

    @property
    def samples(self) -> list[int]:
        return [s.samples for s in self.shards]

    @property
    def fingerprint(self) -> str:
        body = self.manifest.fingerprint + "|" + ",".join(s.name for s in self.shards)
        return hashlib.sha256(body.encode()).hexdigest()


def _select(manifest: Manifest, names: list[str], where: str) -> list[ShardInfo]:
    by_name = {s.name: s for s in manifest.shards}
    missing = [n for n in names if n not in by_name]
    if missing:
        raise ManifestError(f"{where}: {missing[0]} is not listed in its manifest.json")
    return [by_name[n] for n in names]


def _read_pipe_manifest(url: str, shard_name: str) -> Manifest:
    from webdataset.gopen import gopen

    manifest_url = url[::-1].replace(shard_name[::-1], MANIFEST_NAME[::-1], 1)[::-1]  # last occurrence
    try:
        with gopen(manifest_url, "rb") as f:
            text = f.read().decode("utf-8")
    except Exception as e:  # noqa: BLE001 - a failing pipe raises a plain Exception from webdataset
        raise ManifestError(f"{manifest_url}: cannot read the manifest beside the shards ({e})") from None
    return parse_manifest(text, manifest_url)


def resolve(spec: str) -> ShardSet:
    """Resolve one source string; ManifestError/ShardError (one line) if anything is missing."""
    if spec.startswith("pipe:") or "://" in spec:  # webdataset URLs: pipe:, http(s)://, gs:// ... via gopen
        urls = list(braceexpand.braceexpand(spec))
        names = []
        for url in urls:
            found = _TAR_NAME.findall(url[5:] if url.startswith("pipe:") else url.split("://", 1)[1])
            if not found:
                raise DataError(f"{url}: cannot find a '<name>.tar' shard file name in this URL")
            names.append(found[-1])
        manifest = _read_pipe_manifest(urls[0], names[0])
        return ShardSet(spec, manifest, tuple(urls), tuple(_select(manifest, names, spec)))
    if os.path.isdir(spec):
        manifest = read_manifest(spec)
        urls = tuple(os.path.join(spec, s.name) for s in manifest.shards)
        shard_set = ShardSet(spec, manifest, urls, manifest.shards)
    else:
        paths = []
        for pattern in braceexpand.braceexpand(spec):
            paths.extend(sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern])
        if not paths:
            raise ShardError(f"{spec}: matches no shard files")
        dirs = {os.path.dirname(os.path.abspath(p)) for p in paths}
        if len(dirs) != 1:
            raise DataError(f"{spec}: shards from {len(dirs)} directories; pass each directory as its own source")
        manifest = read_manifest(dirs.pop())
        shards = _select(manifest, [os.path.basename(p) for p in paths], spec)
        shard_set = ShardSet(spec, manifest, tuple(paths), tuple(shards))
    for url, shard in zip(shard_set.urls, shard_set.shards):  # cheap early check: catches truncated copies
        try:
            size = os.path.getsize(url)
        except OSError:
            raise ShardError(f"{url}: shard listed in manifest.json is missing") from None
        if size != shard.bytes:
            raise ShardError(f"{url}: {size} bytes on disk, manifest says {shard.bytes} (truncated or replaced; "
                             "run `pretrain-data verify`)")
    return shard_set
