"""Checkpoint commit protocol: a `step_<N>/` directory is either complete and verified, or it does not count.

Why our own protocol around DeepSpeed (the reliability contract): DeepSpeed's `save_checkpoint` writes its
`latest` file from rank 0 before the other ranks are done, and `load_checkpoint` without one only warns and
returns None -- a known way to "resume" on random weights. So a save here is:

    all ranks   write into run_dir/.tmp_step_<N>/: engine state (callback), rank_<r>.pt (loader cursor + RNG),
                each with the sha256 of what it wrote (files.py hashes while writing)
    rank 0      writes config.yaml and meta.json (step, MLflow run id, tokenizer identity, layout)
    agreement   every rank is done writing, or one failed and the save fails everywhere
    rank 0      writes manifest.json LAST (every file, its size and sha256), renames the temp dir to step_<N>/,
                replaces `latest` atomically (temp file + os.replace), prunes to `keep`
    agreement   nobody runs ahead of the commit

`save_in_background` runs the same stages with training paused only for the host copy of the state.

A load verifies the manifest (every file present, sizes and recorded hashes match) after checking what the run
directory's small files say (records.py: `latest` a bare step name of this run, manifest paths inside the step,
no symlink, meta.json a typed record). `resume: auto` walks from `latest` back to older checkpoints and says so
when it skips one (a `latest` that is no step name of this run is skipped the same way); an explicit path that
fails to verify is a hard error. Ranks all-reduce the step they chose so that no two ranks resume from different
checkpoints.

The module knows nothing about the model: the engine's save/load are callbacks, so the protocol is tested on
its own with 2 gloo ranks.
"""
from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np
import torch

from pretrain.checkpoint import files as checkpoint_files
from pretrain.checkpoint import records
from pretrain.checkpoint.records import CheckpointError, Meta
from pretrain.console import say
from pretrain.run.paths import CONFIG, DIGESTS, LATEST, MANIFEST, META, STEP_RE, TEMP_PREFIX, rank_file, step_dir_name
from pretrain.run.resolved import ResolvedRun


class Collective(Protocol):
    """The slice of `pretrain.run.distributed.DistEnv` this module needs (so it can be tested without an engine)."""
    rank: int
    world_size: int

    def barrier(self) -> None: ...
    def all_reduce_max(self, value: float) -> float: ...


# ------------------------------------------------------------------------------------------------- RNG


def rng_state() -> dict[str, Any]:
    """Every RNG a step may draw from (python, numpy, torch CPU, and CUDA when present)."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        # A resume on a node that sees fewer GPUs (another layout) restores the generators it has.
        for device, cuda_state in enumerate(state["cuda"][:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state, device)


# ------------------------------------------------------------------------------------------------ save


def atomic_write(path: Path, data: bytes) -> None:
    """Written under a temporary name, synced, renamed: a reader sees the old file or the whole new one."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def point_latest(run_dir: Path, step: int) -> None:
    """`latest` names step_<step>/ (replaced atomically)."""
    atomic_write(run_dir / LATEST, f"{step_dir_name(step)}\n".encode())


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def write_manifest(root: Path, meta: Meta, world_size: int) -> None:
    """Every file's size and sha256: the ranks' digests taken while writing (model and optimizer shards, rank
    files), a read for the rest (config, meta, tokenizer, DeepSpeed's helper scripts: small)."""
    written: dict[str, list] = {}
    for part in sorted((root / DIGESTS).glob("*.json")):
        written.update(json.loads(part.read_text()))
    shutil.rmtree(root / DIGESTS, ignore_errors=True)  # none for an import (pretrain/hf/importer.py)
    files = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.name != MANIFEST:
            rel, size = p.relative_to(root).as_posix(), p.stat().st_size
            digest = written.get(rel)
            sha = digest[1] if digest and digest[0] == size else _sha256(p)
            files[rel] = {"size": size, "sha256": sha}
    manifest = {"step": meta.step, "world_size": world_size, "created": time.time(), "files": files}
    atomic_write(root / MANIFEST, json.dumps(manifest, indent=1).encode())


def remove_stale_temps(run_dir: str | Path) -> None:
    """Delete the `.tmp_step_<N>/` a killed save left behind (they hold no committed state and can fill a disk).
    Only safe while holding the run lock: then no other launch is writing one."""
    for tmp in sorted(Path(run_dir).glob(f"{TEMP_PREFIX}*")):
        if tmp.is_dir() and STEP_RE.match(tmp.name.removeprefix(TEMP_PREFIX)):
            shutil.rmtree(tmp, ignore_errors=True)
            say(f"removed {tmp}: an unfinished save of an earlier launch")


class _Commit:
    """The commit protocol of one step, in three stages, each ended by an agreement of all ranks:
    1. rank 0 makes `.tmp_step_<N>/`;  2. every rank writes its files (engine state through the save_model
    callback, its rank file), the digests of what it wrote, and rank 0 config + meta;  3. rank 0 writes the
    manifest, renames the directory to `step_<N>/`, points `latest` at it and prunes old steps.
    A write that fails (disk full, quota, read-only, file too large) on any rank fails the stage on every rank:
    the temporary directory is removed and CheckpointWriteError names the cause and the last good checkpoint,
    which is untouched."""

    def __init__(self, run_dir: str | Path, step: int, meta: Meta, config_yaml: str, keep: int):
        self.run_dir, self.step, self.meta, self.config_yaml, self.keep = Path(run_dir), step, meta, config_yaml, keep
        self.tmp = self.run_dir / f"{TEMP_PREFIX}{step_dir_name(step)}"
        self.final = self.run_dir / step_dir_name(step)

    def stage(self, coll: Collective, rank0: Callable[[], None] | None,
              every_rank: Callable[[], None] | None = None) -> None:
        failure: Exception | None = None
        try:
            if coll.rank == 0 and rank0 is not None:
                rank0()
            if every_rank is not None:
                every_rank()
        except Exception as e:  # noqa: BLE001 - every rank must hear of it, whatever it is
            failure = e
        if coll.all_reduce_max(1.0 if failure else 0.0) > 0:
            if coll.rank == 0:
                shutil.rmtree(self.tmp, ignore_errors=True)
            written = checkpoint_files.os_error(failure)  # disk full, quota, read-only (possibly wrapped)
            if failure is not None and written is None:
                raise failure  # a bug, not the disk: its own traceback (the other ranks fail the save too)
            raise CheckpointWriteError(_write_failure(self.run_dir, self.step, written))

    def begin(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(self.tmp, ignore_errors=True)  # debris of a save that died half-way
        self.tmp.mkdir()

    def rank_parts(self, env: Collective, save_model: Callable[[Path], None], rank_state: dict[str, Any]) -> None:
        save_model(self.tmp)
        checkpoint_files.save({"step": self.step, "rank": env.rank, "world_size": env.world_size, **rank_state,
                               "rng": rng_state()}, self.tmp / rank_file(env.rank))

    def records(self, rank: int) -> None:
        (self.tmp / DIGESTS).mkdir(exist_ok=True)
        atomic_write(self.tmp / DIGESTS / f"{rank}.json",
                     json.dumps(checkpoint_files.take_digests(self.tmp)).encode())
        if rank == 0:
            atomic_write(self.tmp / CONFIG, self.config_yaml.encode())
            atomic_write(self.tmp / META, json.dumps(self.meta.__dict__, indent=1, default=str).encode())

    def commit(self, world_size: int) -> None:
        write_manifest(self.tmp, self.meta, world_size)
        if self.final.exists():  # a step re-saved (e.g. a resumed run that stops at once): replace, never merge
            shutil.rmtree(self.final)
        os.replace(self.tmp, self.final)
        point_latest(self.run_dir, self.step)
        _prune(self.run_dir, self.keep, protect=self.final)


def save(run_dir: str | Path, step: int, env: Collective, *, save_model: Callable[[Path], None],
         rank_state: dict[str, Any], meta: Meta, config_yaml: str, keep: int) -> Path:
    """Commit `step_<step>/` under `run_dir` (collective: every rank calls it) and return it (see _Commit)."""
    c = _Commit(run_dir, step, meta, config_yaml, keep)
    c.stage(env, c.begin)
    c.stage(env, None, lambda: (c.rank_parts(env, save_model, rank_state), c.records(env.rank)))
    c.stage(env, lambda: c.commit(env.world_size))
    return c.final


def step_bytes(step_dir: Path) -> int:
    """What a committed step holds on disk: every file its manifest lists, and the manifest."""
    manifest = step_dir / MANIFEST
    return sum(int(f["size"]) for f in json.loads(manifest.read_text())["files"].values()) + manifest.stat().st_size


class PendingSave:
    """A checkpoint being written in the background. `wait()` returns its directory once committed (or raises
    CheckpointWriteError); `paused_s` is how long training stopped for it (the host copy), `total_s` the whole
    save, `bytes` what it wrote (all ranks' files; known on rank 0, once committed); `waited_s` the time the loop
    later waited for it to commit (`CheckpointManager.wait`)."""

    def __init__(self, future: concurrent.futures.Future | None, paused_s: float, started: float, step: int):
        self.future, self.paused_s, self.started, self.step = future, paused_s, started, step
        self.total_s: float | None = None
        self.bytes: int | None = None
        self.waited_s = 0.0
        self.reported = False  # handed to the step log (CheckpointManager.committed)

    def wait(self) -> Path:
        return self.future.result()

    def committed(self) -> bool:
        """Committed without error, known without blocking."""
        return self.future is not None and self.future.done() and self.future.exception() is None

    @property
    def blocked_s(self) -> float:
        """How long training was held up by this save: the host copy, and any later wait for its commit (at most
        the whole save)."""
        return min(self.paused_s + self.waited_s, self.total_s if self.total_s is not None else float("inf"))

    @staticmethod
    def done(path: Path, seconds: float, step: int, bytes_written: int | None) -> PendingSave:
        """A save that ran in the foreground."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        future.set_result(path)
        pending = PendingSave(future, seconds, time.monotonic() - seconds, step)
        pending.total_s, pending.bytes = seconds, bytes_written
        return pending

    def summary(self) -> str:
        """`training paused P s, the save took T s (B MB, G GB/s)`: the line each commit logs."""
        size = f" ({self.bytes / 1e6:.1f} MB, {gb_per_s(self.bytes, self.total_s):.2f} GB/s)" if self.bytes else ""
        return f"training paused {self.paused_s:.2f} s, the save took {self.total_s:.2f} s{size}"


def gb_per_s(nbytes: int | None, seconds: float | None) -> float | None:
    """Write speed in GB/s (10^9 bytes); None when either is unknown or the time is 0."""
    return nbytes / seconds / 1e9 if nbytes is not None and seconds else None


_WRITER = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint-writer")


def save_in_background(run_dir: str | Path, step: int, env: Collective, side: Collective, *,
                       save_model: Callable[[Path], None], rank_state: dict[str, Any], meta: Meta, config_yaml: str,
                       keep: int, report: bool = False) -> PendingSave:
    """The same commit, with training paused only while the state is copied to host memory: the files are
    written, hashed and committed on a writer thread, whose agreements run on `side` (a process group of their
    own). Wait for the result before the next save and before the process ends."""
    started = time.monotonic()
    c = _Commit(run_dir, step, meta, config_yaml, keep)
    c.stage(env, c.begin)
    with checkpoint_files.deferred() as jobs:
        c.stage(env, None, lambda: c.rank_parts(env, save_model, rank_state))
    pending = PendingSave(None, time.monotonic() - started, started, step)

    def finish() -> Path:
        c.stage(side, None, lambda: (checkpoint_files.write_all(jobs), c.records(side.rank)))
        c.stage(side, lambda: c.commit(side.world_size))
        pending.total_s = time.monotonic() - started
        if side.rank == 0:
            pending.bytes = step_bytes(c.final)
            if report:
                say(f"{c.final.name} committed: {pending.summary()}")
        return c.final

    pending.future = _WRITER.submit(finish)
    return pending


class CheckpointWriteError(CheckpointError):
    """A checkpoint could not be written (disk full, quota, read-only, ...); the last good one is untouched."""


def _write_failure(run_dir: Path, step: int, error: OSError | None) -> str:
    try:
        name = records.read_latest(run_dir)
    except CheckpointError:
        name = None
    good = run_dir / name if name else None
    cause = (f"{error.strerror or error} ({error.filename})" if error is not None and error.filename else
             f"{error}" if error is not None else "another rank could not write its part")
    return (f"could not write checkpoint step_{step} in {run_dir}: {cause}; removed the unfinished copy. The last "
            f"good checkpoint is {good or 'none (nothing saved yet)'}: free space or fix the directory and resume")


def _prune(run_dir: Path, keep: int, protect: Path) -> None:
    steps = sorted(list_steps(run_dir), reverse=True)
    for step in steps[keep:]:
        path = run_dir / step_dir_name(step)
        if path != protect:
            shutil.rmtree(path, ignore_errors=True)


# ------------------------------------------------------------------------------------------------ load


def list_steps(run_dir: Path) -> list[int]:
    """The N of every `step_<N>` directory of the run (a symlink named so is none: see records.step_dir_in)."""
    if not run_dir.is_dir():
        return []
    return sorted(int(m.group(1)) for p in run_dir.iterdir()
                  if (m := STEP_RE.match(p.name)) and p.is_dir() and not p.is_symlink())


def verify(step_dir: str | Path, *, hashes: bool = True, share: tuple[int, int] = (0, 1)) -> dict[str, Any]:
    """The manifest of a complete checkpoint, or CheckpointError saying what is wrong with it. Every file's size is
    checked; with `share=(i, n)` only every n-th file from the i-th has its sha256 computed (the rest is another
    rank's share).

    Before any file is opened (pretrain/checkpoint/records.py): every manifest entry is a path inside the
    directory, no symlink is in it, and it holds no file the manifest does not list (DeepSpeed and the offline
    reader find some files by name, so one planted beside the vouched ones would be read unchecked). After the
    sizes and hashes: meta.json is a valid record whose step is the directory's and the manifest's."""
    step_dir = Path(step_dir)
    if not step_dir.is_dir():
        raise CheckpointError(f"checkpoint {step_dir} does not exist")
    mpath = step_dir / MANIFEST
    if not os.path.lexists(mpath):
        raise CheckpointError(f"checkpoint {step_dir} is incomplete: no {MANIFEST} (the save did not finish)")
    manifest = records.check_manifest(step_dir, records.read_json(mpath))
    files = manifest["files"]
    records.refuse_symlinks(step_dir)
    listed = {records.inside_path(step_dir, rel) for rel in files} | {mpath}
    for p in step_dir.rglob("*"):
        if not p.is_dir() and p not in listed:
            raise CheckpointError(f"checkpoint {step_dir}: {p.relative_to(step_dir).as_posix()} is not in its "
                                  f"{MANIFEST} (a save lists every file it writes); refusing the checkpoint")
    if META not in files:
        raise CheckpointError(f"checkpoint {step_dir} is incomplete: {MANIFEST} does not list {META}")
    for index, (rel, entry) in enumerate(sorted(files.items())):
        p = records.inside_path(step_dir, rel)
        if not p.is_file():
            raise CheckpointError(f"checkpoint {step_dir} is incomplete: {rel} is missing")
        size = p.stat().st_size
        if size != entry["size"]:
            raise CheckpointError(f"checkpoint {step_dir} is corrupt: {rel} has {size} bytes, "
                                  f"manifest says {entry['size']}")
        if hashes and index % share[1] == share[0] and "sha256" in entry and _sha256(p) != entry["sha256"]:
            raise CheckpointError(f"checkpoint {step_dir} is corrupt: {rel} does not match its sha256")
    records.parse_meta(step_dir, records.read_json(step_dir / META), manifest["step"])
    return manifest


def _say(msg: str) -> None:
    say(msg, topic="checkpoint")


def _auto_candidates(run_dir: Path) -> tuple[list[Path], str | None]:
    """`latest` first, then every step_<N> newest first (a `latest` may point at a pruned or broken dir), and why
    `latest` was not followed, if it was not (records.read_latest: only a bare step name of this run counts)."""
    out: list[Path] = []
    refused = None
    try:
        if (name := records.read_latest(run_dir)) is not None:
            out.append(run_dir / name)
    except CheckpointError as e:
        refused = str(e)
    if run_dir.is_dir():  # symlinks named step_<N> too: verification refuses them by name, never silently
        named = [(n, p) for p in run_dir.iterdir() if (n := records.step_of_name(p.name)) is not None
                 and (p.is_dir() or p.is_symlink())]
        out += [p for _, p in sorted(named, key=lambda x: x[0], reverse=True)]
    seen: set[Path] = set()
    return [p for p in out if not (p in seen or seen.add(p))], refused


def choose(run_dir: str | Path, resume: str, env: Collective) -> Path | None:
    """Which checkpoint to resume from (collective). None: start fresh. Every rank gets the same answer.

    `none` -> None. `auto` -> the newest checkpoint that verifies, announcing every one it skips; None when
    the run dir has no checkpoint at all; an error when it has some but none verifies (starting from scratch
    over a broken run is a decision for the user, not for us). A path -> that checkpoint or an error.
    """
    run_dir = Path(run_dir)
    chosen: Path | None = None
    error: str | None = None
    loud = env.rank == 0
    if resume == "none":
        pass
    elif resume == "auto":
        # A `latest` that is no bare step name of this run is refused and the walk goes on over this run's own
        # step directories, newest first: never another run's checkpoint, and never an older one of this run than
        # the newest that verifies (which would have its newer steps pruned and metrics.jsonl cut back).
        candidates, refused = _auto_candidates(run_dir)
        skipped: list[str] = [refused] if refused else []
        if refused and loud:
            _say(f"refusing: {refused}")
        for cand in candidates:
            reason = _verify_together(cand, env, in_run=True)
            if reason is not None:
                skipped.append(reason)
                if loud:
                    _say(f"refusing: {reason}")
                continue
            chosen = cand  # another world size is fine: pretrain.checkpoint.resume re-slices it (or refuses, for an old step)
            if skipped and loud:
                _say(f"falling back to the previous complete checkpoint {cand}")
            break
        if chosen is None and skipped:
            error = (f"no complete checkpoint in {run_dir} ({skipped[0]}); "
                     "set checkpoint.resume=none to start over")
    else:
        error = _verify_together(Path(resume), env)
        chosen = None if error else Path(resume)
    # Agreement: the step each rank chose (-1: fresh, -2: error) must be the same everywhere.
    mine = -2.0 if error else (-1.0 if chosen is None else float(_step_of(chosen)))
    hi, lo = env.all_reduce_max(mine), -env.all_reduce_max(-mine)
    if error:
        raise CheckpointError(error)
    if lo == -2.0:
        raise CheckpointError("another rank could not verify the checkpoint it was asked to load (see its log)")
    if hi != lo:
        raise CheckpointError(f"ranks disagree on the checkpoint to resume (steps {int(lo)} and {int(hi)}); "
                              "is checkpoint.dir on a filesystem every node shares?")
    return chosen


def _verify_together(step_dir: Path, env: Collective, *, in_run: bool = False) -> str | None:
    """Why `step_dir` is unusable, or None (collective). Every rank checks every file's size and hashes its share
    of the files, so a resume reads the checkpoint once in all, not once per rank; a failure anywhere fails it
    everywhere. `in_run`: found in the run directory, where a symlinked step would lead out of the run (a path
    the user names may be one)."""
    try:
        if in_run:
            records.step_dir_in(step_dir.parent, step_dir.name)
        verify(step_dir, share=(env.rank, env.world_size))
        reason = None
    except CheckpointError as e:
        reason = str(e)
    if env.all_reduce_max(1.0 if reason else 0.0) > 0:
        return reason or f"checkpoint {step_dir} failed verification on another rank (see its log)"
    return None


def _step_of(step_dir: Path) -> int:
    return int(records.check_manifest(step_dir, records.read_json(step_dir / MANIFEST))["step"])


@dataclass
class Loaded:
    step: int
    meta: Meta
    rank_state: dict[str, Any]


def load(step_dir: str | Path, env: Collective, *, load_model: Callable[[Path], None],
         saved_rank: int | None = None) -> Loaded:
    """Load a chosen (verified) checkpoint: engine state via callback, a rank's state (this rank's, or
    `saved_rank`'s when the layout changed), RNG restored last."""
    step_dir = Path(step_dir)
    meta = read_meta(step_dir)
    load_model(step_dir)
    rank = env.rank if saved_rank is None else saved_rank
    path = step_dir / rank_file(rank)
    state = read_rank_file(path, meta.step)
    try:
        set_rng_state(state.pop("rng"))
    except (TypeError, ValueError, KeyError, IndexError, RuntimeError) as e:
        raise CheckpointError(f"{path}: field rng is not the RNG state a save records ({type(e).__name__}: "
                              f"{(str(e).strip().splitlines() or [''])[0][:160]})") from None
    return Loaded(step=meta.step, meta=meta, rank_state=state)


def read_rank_file(path: Path, step: int | None = None) -> dict[str, Any]:
    """A rank file's state (loader cursor, RNG, ...), checked: an object with the fields a save writes, of `step`
    when given; any fault a CheckpointError naming the file and the field."""
    state = checkpoint_files.load(path)
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: holds a {type(state).__name__}, not a rank file's state")
    for key, kind in (("rng", dict), ("loader", dict)):
        if not isinstance(state.get(key), kind):
            raise CheckpointError(f"{path}: field {key} is missing or not an object")
    got = state.get("step", step)
    if (got is not None and type(got) is not int) or (step is not None and got != step):
        raise CheckpointError(f"{path}: field step is {records.show(got)}" + (
            f", but {META} says {step}" if step is not None else ", not a whole number"))
    return state


def read_meta(step_dir: str | Path) -> Meta:
    """meta.json of a step directory as a checked record (pretrain/checkpoint/records.py): CheckpointError naming
    the file and the field otherwise."""
    step_dir = Path(step_dir)
    path = step_dir / META
    if not os.path.lexists(path):
        raise CheckpointError(f"checkpoint {step_dir} has no {META}")
    mpath = step_dir / MANIFEST
    manifest = records.check_manifest(step_dir, records.read_json(mpath)) if os.path.lexists(mpath) else None
    return records.parse_meta(step_dir, records.read_json(path), manifest["step"] if manifest else None)


def run_of(step_dir: str | Path) -> ResolvedRun:
    """The run a committed checkpoint was written by (its meta.json); one-line error if it has none."""
    meta = read_meta(step_dir)
    if not meta.resolved:
        raise CheckpointError(f"{step_dir}/{META} has no resolved run (written by an older version); re-save it "
                              "with this version")
    return ResolvedRun.from_dict(meta.resolved)


def resolve_checkpoint_arg(path: str | Path) -> Path:
    """A run dir (-> its `latest`) or a step dir, verified: what `pretrain generate --checkpoint` accepts. A run
    dir's `latest` must name one of its own step dirs (records.read_latest), else the command is refused."""
    path = Path(path)
    if path.name == LATEST and os.path.lexists(path) and not path.is_dir():  # RUN/latest: the step it names
        path = path.parent
    if (name := records.read_latest(path)) is not None:
        path = records.step_dir_in(path, name)
    verify(path)
    return path
