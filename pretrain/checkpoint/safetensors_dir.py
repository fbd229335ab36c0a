"""A directory of safetensors files the way transformers writes and reads them, streamed tensor by tensor.

Written: `model.safetensors` when everything fits in one shard, else `model-0000i-of-0000n.safetensors` plus
`model.safetensors.index.json` ({"metadata": {"total_size": bytes}, "weight_map": {name: file}}). The writer
takes an iterator of (name, tensor) and holds at most one output shard plus the tensor being added, so exporting
a model needs memory for one shard, not for the model. The shard count is known only at the end, so shards are
written under temporary names and renamed once the last one is done.

Read: the same layout (or a single file), one tensor at a time through safetensors' memory map.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, Iterator

import torch
from safetensors import safe_open
from safetensors.torch import save_file

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
DEFAULT_SHARD_BYTES = 5 * 10**9  # what `--max-shard-size` defaults to: 5GB, as the Hub's large models use
_UNITS = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str) -> int:
    """'5GB' / '500MB' / '2GiB' / a plain byte count -> bytes (transformers' `max_shard_size` spelling)."""
    s = text.strip().upper()
    for unit in sorted(_UNITS, key=len, reverse=True):
        if s.endswith(unit):
            number = s[: -len(unit)].strip()
            break
    else:
        unit, number = "", s
    try:
        value = float(number) * (_UNITS[unit] if unit else 1)
    except ValueError:
        raise ValueError(f"size {text!r}: expected a number with KB/MB/GB/TB (or KiB/MiB/GiB), e.g. 5GB") from None
    if value <= 0:
        raise ValueError(f"size {text!r} must be positive")
    return int(value)


def _owned(t: torch.Tensor) -> torch.Tensor:
    """safetensors refuses tensors that share storage; a view is copied so each entry owns its bytes."""
    t = t.detach().contiguous()
    return t if t.untyped_storage().nbytes() == t.nbytes else t.clone()


def write_sharded(items: Iterable[tuple[str, torch.Tensor]], out_dir: str | Path,
                  max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> list[str]:
    """Write every (name, tensor) into `out_dir` (which must exist); returns the file names written.

    A shard is closed when the next tensor would push it past `max_shard_bytes` (a tensor bigger than the limit
    gets a shard of its own, as in transformers)."""
    out_dir = Path(out_dir)
    parts: list[Path] = []
    weight_map: dict[str, int] = {}  # name -> shard number (0-based)
    shard: dict[str, torch.Tensor] = {}
    size = total = params = 0

    def flush() -> None:
        part = out_dir / f".part-{len(parts):05d}.safetensors"
        save_file(shard, str(part), metadata={"format": "pt"})
        parts.append(part)
        shard.clear()

    for name, tensor in items:
        if name in weight_map or name in shard:
            raise ValueError(f"tensor {name!r} given twice")
        tensor = _owned(tensor)
        nbytes = tensor.nbytes
        if shard and size + nbytes > max_shard_bytes:
            flush()
            size = 0
        shard[name] = tensor
        weight_map[name] = len(parts)
        size, total, params = size + nbytes, total + nbytes, params + tensor.numel()
        del tensor
    if shard or not parts:
        flush()

    if len(parts) == 1:
        os.replace(parts[0], out_dir / SINGLE)
        return [SINGLE]
    names = [f"model-{i + 1:05d}-of-{len(parts):05d}.safetensors" for i in range(len(parts))]
    for part, name in zip(parts, names):
        os.replace(part, out_dir / name)
    index = {"metadata": {"total_size": total, "total_parameters": params},
             "weight_map": {k: names[i] for k, i in weight_map.items()}}
    (out_dir / INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return [*names, INDEX]


class SafetensorsDir:
    """Read-only view of a (possibly sharded) safetensors directory: names in file order, one tensor at a time."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        index = self.directory / INDEX
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"{index}: unreadable safetensors index ({e})") from None
            self.files = {name: self.directory / f for name, f in weight_map.items()}
        elif (self.directory / SINGLE).is_file():
            with safe_open(self.directory / SINGLE, framework="pt") as f:
                self.files = {name: self.directory / SINGLE for name in f.keys()}
        else:
            raise FileNotFoundError(f"{self.directory}: neither {SINGLE} nor {INDEX}")
        missing = sorted({str(p) for p in self.files.values() if not p.is_file()})
        if missing:
            raise FileNotFoundError(f"{self.directory}: {INDEX} names missing files: {', '.join(missing[:3])}")

    def names(self) -> list[str]:
        return list(self.files)

    def tensor(self, name: str) -> torch.Tensor:
        if name not in self.files:
            raise KeyError(f"{self.directory}: no tensor {name!r}")
        with safe_open(self.files[name], framework="pt") as f:
            return f.get_tensor(name)

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name in self.names():
            yield name, self.tensor(name)
