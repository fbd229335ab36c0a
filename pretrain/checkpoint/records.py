"""What a run directory's small files say, checked before any of it is used: `latest`, manifest.json, meta.json.

Why: these files steer a resume, `generate`, `export-hf`, `convert-checkpoint` and `model.init_from`. The
manifest's hashes vouch that the big files are the ones the save wrote, but not that the small files make
sense: an edited or planted file (with the manifest re-hashed, or a `latest` nothing hashes) could make a
resume load another run's checkpoint and prune this run's newer steps, start at step -4 and never stop the
profiler, or open and hash any file of the host. So each file is read here as a typed record, and anything
else is a CheckpointError: one line naming the file and the field (the CLI's exit 2).

    latest         a regular file holding one bare name `step_<N>` of a real directory (not a symlink) inside
                   the run directory: no slash, no `..`, not absolute (resume `auto` refuses a bad one and falls
                   back to this run's own newest step that verifies: see pretrain/checkpoint/commit.py `choose`)
    manifest.json  {"step": N, "world_size": W, "created": t, "files": {path: {"size": n, "sha256": hex}}}, N the
                   directory's own; every path relative, POSIX, with no empty, `.` or `..` part, checked before
                   any file is opened or hashed
    meta.json      `Meta`'s keys only, each of its type; `step` a whole number >= 0 equal to the directory's N and
                   the manifest's; `layout` a Layout and `resolved` a ResolvedRun (known keys, types, counts >= 1)
                   that agree with each other and with `tokenizer`

Symlinks: no symlink inside a step directory is followed, whatever it points at (`refuse_symlinks`). Our saves
never write one, so one found there was planted or copied in; following only those that resolve inside the step
directory would still let a link make two manifest entries one file, and "inside" would have to be re-checked
at every open (a link can be swapped between check and use). The step directory itself may be a symlink only
when a user names it explicitly; reached through a run directory (`latest`, resume `auto`) it must be a real
directory of that run (`step_dir_in`).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from pretrain.run.layout import Layout
from pretrain.run.paths import LATEST, MANIFEST, META, STEP_RE  # noqa: F401 - re-exported
from pretrain.run.resolved import ResolvedRun, TokenizerFacts


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: the message is one line naming the directory and the reason."""


@dataclass
class Meta:
    """What rank 0 records about a checkpoint besides the tensors."""
    step: int
    mlflow_run_id: str | None = None
    tokenizer: dict[str, Any] = field(default_factory=dict)  # identity of the shards' tokenizer (hash, dir, eos)
    layout: dict[str, Any] = field(default_factory=dict)
    resolved: dict[str, Any] = field(default_factory=dict)  # pretrain.run.resolved.ResolvedRun.to_dict()
    extra: dict[str, Any] = field(default_factory=dict)


def step_of_name(name: str) -> int | None:
    """N of a directory named `step_<N>`, else None."""
    m = STEP_RE.match(name)
    return int(m.group(1)) if m else None


# ------------------------------------------------------------------------------------------------- latest


def read_latest(run_dir: Path) -> str | None:
    """The step directory name `run_dir/latest` holds (checked as the module docstring says), or None when there is
    no `latest` at all."""
    path = run_dir / LATEST
    if not os.path.lexists(path):
        return None
    if path.is_symlink() or not path.is_file():
        raise CheckpointError(f"{path}: not a regular file (a save writes `latest` as one); refusing to follow it")
    try:
        name = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: unreadable ({type(e).__name__}: {show(str(e), 160)})") from None
    if not STEP_RE.match(name):
        raise CheckpointError(f"{path}: holds {show(name)}, not the bare name of a step directory (step_<N>) "
                              f"inside {run_dir}; refusing to follow it")
    step_dir_in(run_dir, name)
    return name


def step_dir_in(run_dir: Path, name: str) -> Path:
    """run_dir/<name> for a `step_<N>` name, refused when it is a symlink (it would lead out of this run)."""
    path = run_dir / name
    if path.is_symlink():
        raise CheckpointError(f"{path}: is a symlink (to {show(os.readlink(path))}); a step directory of this run is a "
                              "real directory, refusing to follow it")
    return path


# ----------------------------------------------------------------------------------------------- manifest


def read_json(path: Path) -> Any:
    """A small JSON file of a checkpoint (a symlink or anything unreadable refused, naming the file)."""
    if path.is_symlink():
        raise CheckpointError(f"{path}: is a symlink; refusing to follow it (a save never writes one)")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable ({type(e).__name__}: {show(str(e), 160)})") from None


def check_manifest(step_dir: Path, manifest: Any) -> dict[str, Any]:
    """The manifest of `step_dir`, checked: structure, types, every path inside the directory, the step its own.
    Nothing of the directory is opened here."""
    where = step_dir / MANIFEST
    if not isinstance(manifest, dict):
        raise CheckpointError(f"{where}: not a JSON object")
    files = manifest.get("files")
    if not isinstance(files, dict):
        raise CheckpointError(f"{where}: field files is missing or not an object")
    step = manifest.get("step")
    if not _whole(step):
        raise CheckpointError(f"{where}: field step must be a whole number >= 0, not {show(step)}")
    if (n := step_of_name(step_dir.name)) is not None and n != step:
        raise CheckpointError(f"{where}: field step is {step}, but the directory is {step_dir.name}")
    if not _whole(manifest.get("world_size", 1), 1):
        raise CheckpointError(f"{where}: field world_size must be a whole number >= 1, not "
                              f"{show(manifest.get('world_size'))}")
    for rel, entry in files.items():
        inside_path(step_dir, rel)
        sound = isinstance(entry, dict) and _whole(entry.get("size")) and isinstance(entry.get("sha256", ""), str)
        if not sound:
            raise CheckpointError(f"{where}: field files[{show(rel)}] must be {{\"size\": bytes, \"sha256\": hex}}, "
                                  f"not {show(entry)}")
    return manifest


def inside_path(step_dir: Path, rel: Any) -> Path:
    """step_dir/<rel> for a manifest entry that is a relative POSIX path with no empty, `.` or `..` part (so it
    cannot name anything outside the directory), without touching the file system."""
    where = step_dir / MANIFEST
    if not isinstance(rel, str) or not rel or "\\" in rel or "\0" in rel:
        raise CheckpointError(f"{where}: file entry {show(rel)} is not a relative POSIX path; refusing it")
    parts = rel.split("/")
    if rel.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise CheckpointError(f"{where}: file entry {show(rel)} leads outside {step_dir} (absolute, or with an "
                              "empty, '.' or '..' part); refusing to open it")
    return step_dir.joinpath(*PurePosixPath(rel).parts)


def refuse_symlinks(step_dir: Path) -> None:
    """No symlink anywhere under `step_dir` (not followed while looking: os.walk does not descend into them)."""
    for root, dirs, names in os.walk(step_dir):
        for name in dirs + names:
            path = Path(root) / name
            if path.is_symlink():
                raise CheckpointError(f"checkpoint {step_dir}: {path.relative_to(step_dir).as_posix()} is a symlink "
                                      f"(to {show(os.readlink(path))}); a save never writes one, refusing to follow it")


# --------------------------------------------------------------------------------------------------- meta


def parse_meta(step_dir: Path, raw: Any, manifest_step: int | None) -> Meta:
    """meta.json's content as a Meta, checked as the module docstring says (`manifest_step`: the manifest's, when
    there is one)."""
    where = step_dir / META
    if not isinstance(raw, dict):
        raise CheckpointError(f"{where}: not a JSON object")
    known = {f.name for f in dataclasses.fields(Meta)}
    for key in raw:
        if key not in known:
            raise CheckpointError(f"{where}: field {show(key)} is not a meta.json field "
                                  f"({', '.join(sorted(known))})")
    if "step" not in raw:
        raise CheckpointError(f"{where}: field step is missing")
    step = raw["step"]
    if not _whole(step):
        raise CheckpointError(f"{where}: field step must be a whole number >= 0, not {show(step)}")
    if (n := step_of_name(step_dir.name)) is not None and n != step:
        raise CheckpointError(f"{where}: field step is {step}, but the directory is {step_dir.name}")
    if manifest_step is not None and manifest_step != step:
        raise CheckpointError(f"{where}: field step is {step}, but {MANIFEST} says {manifest_step}")
    run_id = raw.get("mlflow_run_id")
    if run_id is not None and not isinstance(run_id, str):
        raise CheckpointError(f"{where}: field mlflow_run_id must be a string or null, not {show(run_id)}")
    for key in ("tokenizer", "layout", "resolved", "extra"):
        if not isinstance(raw.get(key, {}), dict):
            raise CheckpointError(f"{where}: field {key} must be an object, not {show(raw[key])}")
    meta = Meta(**raw)
    _check_parts(where, meta)
    return meta


def _check_parts(where: Path, meta: Meta) -> None:
    """tokenizer, layout and resolved: typed records that agree with each other."""

    if meta.tokenizer:
        check_record(where, "tokenizer", meta.tokenizer, TokenizerFacts)
    if meta.layout:
        check_record(where, "layout", meta.layout, Layout)
    if not meta.resolved:
        return
    check_record(where, "resolved", meta.resolved, ResolvedRun)
    try:
        run = ResolvedRun.from_dict(meta.resolved)
    except (TypeError, KeyError, ValueError, AttributeError) as e:
        raise CheckpointError(f"{where}: field resolved is not a resolved run ({type(e).__name__}: {e})") from None
    for key, ok in (("seq_len", run.seq_len >= 1), ("zero_stage", run.zero_stage in (0, 1, 2, 3)),
                    ("dtype", run.dtype in ("fp32", "bf16"))):
        if not ok:
            raise CheckpointError(f"{where}: field resolved.{key} is {show(getattr(run, key))}, which no run has")
    if meta.layout and meta.layout != dataclasses.asdict(run.layout):
        raise CheckpointError(f"{where}: field layout disagrees with resolved.layout")
    theirs = run.tokenizer.identity if run.tokenizer else None
    if meta.tokenizer and theirs is not None and meta.tokenizer.get("identity") != theirs:
        raise CheckpointError(f"{where}: field tokenizer.identity {str(meta.tokenizer.get('identity'))[:12]} "
                              f"disagrees with resolved.tokenizer.identity {theirs[:12]}")


# The dataclasses whose whole numbers count things (at least 1); elsewhere a whole number is at least 0.
_COUNTS = ("Layout", "ModelArgs")


def check_record(where: Path, name: str, value: Any, cls: type) -> None:
    """`value` (JSON) is a `cls` dataclass: an object with its fields only, those without a default present, each
    of its declared type (a whole number where int, a finite number where float; dataclasses recursively)."""
    if not isinstance(value, dict):
        raise CheckpointError(f"{where}: field {name} must be an object, not {show(value)}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for key in value:
        if key not in fields:
            raise CheckpointError(f"{where}: field {name}.{str(key)[:40]} is not a field of {cls.__name__}")
    for key, f in fields.items():
        if key not in value:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise CheckpointError(f"{where}: field {name}.{key} is missing")
            continue
        _check_value(where, f"{name}.{key}", value[key], hints[key], 1 if cls.__name__ in _COUNTS else 0)


def _check_value(where: Path, name: str, value: Any, hint: Any, least: int) -> None:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        arms = typing.get_args(hint)
        if value is None and type(None) in arms:
            return
        hint = next(a for a in arms if a is not type(None))
        origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        check_record(where, name, value, hint)
        return
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise CheckpointError(f"{where}: field {name} must be a list, not {show(value)}")
        for i, item in enumerate(value):
            _check_value(where, f"{name}[{i}]", item, typing.get_args(hint)[0], least)
        return
    ok = {int: lambda v: _whole(v, least), float: _finite, str: lambda v: isinstance(v, str),
          bool: lambda v: isinstance(v, bool)}.get(hint, lambda v: True)
    if not ok(value):
        kind = {int: f"a whole number >= {least}", float: "a finite number", str: "a string",
                bool: "true or false"}[hint]
        raise CheckpointError(f"{where}: field {name} must be {kind}, not {show(value)}")


def show(value: Any, limit: int = 80) -> str:
    """A value as it would be written in JSON-ish repr, cut to `limit` characters (the message stays one line)."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _whole(value: Any, least: int = 0) -> bool:
    """A JSON whole number (not a bool, not a float such as 1e30) >= least."""
    return type(value) is int and value >= least


def _finite(value: Any) -> bool:
    return type(value) in (int, float) and math.isfinite(value)
