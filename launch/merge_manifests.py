"""`python -m launch.merge_manifests PART_DIR... --out DIR`: the shard directories of a SLURM array job -> one.

`slurm/prepare_data.sbatch` runs `pretrain-data prepare` once per array task, each on every Nth input file,
into `<out>/parts/part-<task>/`. This joins them: every part's shards are hard-linked (copied across file
systems) into `<out>` under one global numbering, in part order, and one manifest.json is written that lists
them with the per-shard counts and sha256 the parts recorded (a rename does not change a tar's bytes, so the
checksums stay valid and `pretrain-data verify <out>` checks them). The parts must agree on tokenizer and dtype:
mixing them would silently make ids mean different text, so that is refused with the two parts named.

Re-running is safe: the merged names are recomputed, existing links replaced, the manifest written last
(temp name + rename), so a reader never sees a merged directory without its complete manifest.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import sys
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

from data_pipeline.errors import DataError
from data_pipeline.manifest import MANIFEST_NAME, Manifest, ShardInfo, read_manifest, write_manifest

SHARD_NAME = "shard-{index:06d}.tar"  # data_pipeline.shard_writer.SHARD_PATTERN
EMPTY_MARKER = "EMPTY"  # a part whose array task had no input files writes only this file


class MergeError(ValueError):
    """One line: which part, what is wrong."""


def _link(src: Path, dst: Path) -> None:
    tmp = dst.with_name(dst.name + ".tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:  # another file system, or links not allowed
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def merge(parts: list[Path], out: Path, command: list[str] | None = None) -> Manifest:
    """Merge the shard directories `parts` (in this order) into `out`; returns the written manifest."""
    manifests: list[tuple[Path, Manifest]] = []
    for part in parts:
        if (part / EMPTY_MARKER).exists() and not (part / MANIFEST_NAME).exists():
            continue
        if not (part / MANIFEST_NAME).exists():
            raise MergeError(f"{part}: no {MANIFEST_NAME} (did its array task fail? its log says why)")
        manifests.append((part, read_manifest(str(part))))
    if not manifests:
        raise MergeError(f"none of the {len(parts)} parts has shards")
    first_dir, first = manifests[0]
    for part, m in manifests[1:]:
        if m.tokenizer.identity != first.tokenizer.identity or m.dtype != first.dtype:
            raise MergeError(f"{part}: tokenizer {m.tokenizer.identity[:12]}/{m.dtype} differs from {first_dir}'s "
                             f"{first.tokenizer.identity[:12]}/{first.dtype}; parts must come from one tokenizer")

    out.mkdir(parents=True, exist_ok=True)
    shards: list[ShardInfo] = []
    skipped: Counter[str] = Counter()
    for part, m in manifests:
        skipped.update(m.skipped)
        for shard in m.shards:
            name = SHARD_NAME.format(index=len(shards))
            _link(part / shard.name, out / name)
            shards.append(dataclasses.replace(shard, name=name))
    merged = Manifest(tokenizer=first.tokenizer, dtype=first.dtype, shards=tuple(shards),
                      command=tuple(command if command is not None else sys.argv), skipped=dict(skipped),
                      created=datetime.now(timezone.utc).isoformat(timespec="seconds"))
    write_manifest(str(out), merged)
    return merged


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launch.merge_manifests", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("parts", nargs="+", type=Path, help="part directories, in order")
    parser.add_argument("--out", required=True, type=Path, help="merged shard directory")
    args = parser.parse_args(argv)
    try:
        merged = merge(args.parts, args.out, command=["python", "-m", "launch.merge_manifests",
                                                      *(argv if argv is not None else sys.argv[1:])])
    except (MergeError, DataError, OSError) as e:
        print(f"merge_manifests: error: {e}", file=sys.stderr)
        return 2
    print(f"merge_manifests: {len(args.parts)} parts -> {args.out}: {len(merged.shards)} shards, "
          f"{merged.total_samples} samples, {merged.total_tokens} tokens")
    return 0


if __name__ == "__main__":
    sys.exit(main())
