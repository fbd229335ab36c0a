"""Checkpoint files: every one hashed (the shards while they are written), and one that carries code refused by name
on every path that loads one, without running it.

A pickle whose `__reduce__` calls `os.system` is added to each kind of file a step holds (DeepSpeed's model states,
its ZeRO optimizer partition, our rank file), with the manifest's size and sha256 updated so the integrity check
passes: what stops it must be the loading itself. Each command exits 2 with one line naming the file and the
function the pickle asked for, and the marker file the payload would create never appears."""
from __future__ import annotations

import hashlib
import json
import mmap
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from spawn import REPO, child_env
from train_common import run_python, tiny_shards, train_args

from pretrain.checkpoint import files as checkpoint_files
from pretrain.cli import main as cli

pytestmark = pytest.mark.slow

MODEL = "model/mp_rank_00_model_states.pt"
OPTIM = "model/bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt"
RANK = "rank_00000.pt"


class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        import os
        return os.system, (f"touch {self.marker}",)


# `python -m pretrain ARGS` with the manifest's read-back hashing reported on stderr (`READ <file name>`): the
# commit module's _sha256 wrapped, nothing else changed.
_REPORT_READS = ("import runpy, sys; sys.argv = sys.argv[1:]; "
                 "import pretrain.checkpoint.commit as c; real = c._sha256; "
                 "c._sha256 = lambda p: (print('READ', p.name, file=sys.stderr), real(p))[1]; "
                 "runpy.run_module('pretrain', run_name='__main__')")


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[Path, Path, list[str]]:
    """A 1-rank bf16 ZeRO-1 run checkpointed at step 2, its shards, and the files its save read back to hash.

    The run that makes the checkpoint reports its reads itself (see `_REPORT_READS`): one launch, not a second
    run only to watch a save."""
    base = tmp_path_factory.mktemp("safe")
    shards = tiny_shards(base / "data") / "shards"
    run = base / "run"
    args = train_args(shards, run, "train.max_steps=2", "checkpoint.every=2", "train.dtype=bf16",
                      "parallel.zero_stage=1")
    p = subprocess.run([sys.executable, "-c", _REPORT_READS, *args[1:]], cwd=REPO, env=child_env(),
                       capture_output=True, text=True, timeout=300)  # args[1:]: "pretrain train ...", no "-m"
    assert p.returncode == 0, p.stderr[-3000:]
    reads = [line.split()[1] for line in p.stderr.splitlines() if line.startswith("READ ")]
    return run, shards, reads


def _poisoned(run: Path, into: Path, file: str) -> tuple[Path, Path]:
    """A copy of the run whose step_2/<file> also holds the payload; the manifest vouches for the new bytes."""
    shutil.copytree(run, into)
    step = into / "step_2"
    marker = into.parent / f"{into.name}.PWNED"
    state = checkpoint_files.load(step / file)
    state["extra"] = _Payload(marker)
    torch.save(state, step / file)
    manifest = json.loads((step / "manifest.json").read_text())
    data = (step / file).read_bytes()
    manifest["files"][file] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (step / "manifest.json").write_text(json.dumps(manifest))
    return step, marker


def _refused(code: int, err: str, marker: Path, file: str) -> None:
    assert code == 2, err[-3000:]
    assert "refusing to load it: it asks to run or build `posix.system`" in err and file.split("/")[-1] in err, \
        err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    assert not marker.exists(), "the checkpoint's payload ran"


@pytest.mark.parametrize("file", [MODEL, OPTIM], ids=["model_states", "optim_states"])
def test_offline_readers_refuse_a_payload(run, tmp_path, capfd, file):
    """export-hf, convert-checkpoint and generate read DeepSpeed's files themselves (CheckpointReader)."""
    step, marker = _poisoned(run[0], tmp_path / "run", file)
    for argv in (["export-hf", "--checkpoint", str(step), "--out", str(tmp_path / "hf")],
                 ["convert-checkpoint", "--checkpoint", str(step), "--to", "universal", "--out", str(tmp_path / "u")],
                 ["generate", "--checkpoint", str(step), "--prompt", "the", "--max-new-tokens", "2"]):
        code = cli(argv)
        _refused(code, capfd.readouterr().err, marker, file)


@pytest.mark.parametrize("file,how", [(MODEL, "resume"), (RANK, "resume"), (OPTIM, "init_from")],
                         ids=["deepspeed_resume", "rank_file_resume", "init_from"])
def test_training_refuses_a_payload(run, tmp_path, file, how):
    """Resuming reads DeepSpeed's files through its checkpoint engine and our rank file; `model.init_from` reads
    the weights (fp32 masters from the optimizer partition) through CheckpointReader."""
    step, marker = _poisoned(run[0], tmp_path / "run", file)
    target = tmp_path / "run" if how == "resume" else tmp_path / "fresh"
    extra = [f"model.init_from={step}"] if how == "init_from" else []
    p = run_python(train_args(run[1], target, "train.max_steps=3", "train.dtype=bf16", "parallel.zero_stage=1",
                              *extra))
    _refused(p.returncode, p.stderr, marker, file)


def test_every_file_is_hashed_and_a_flipped_byte_anywhere_is_refused(run, tmp_path):
    """The manifest has a sha256 for every file, the .pt shards' taken while they were written (no second read:
    reading files back to hash them is only done for the small ones); 64 flipped bytes in the middle of the
    optimizer partition are refused by name."""
    from pretrain import checkpoint

    step = run[0] / "step_2"
    manifest = json.loads((step / "manifest.json").read_text())
    files = sorted(p.relative_to(step).as_posix() for p in step.rglob("*") if p.is_file())
    assert sorted(manifest["files"]) == [f for f in files if f != "manifest.json"]
    for rel, entry in manifest["files"].items():
        assert entry["sha256"] == hashlib.sha256((step / rel).read_bytes()).hexdigest(), rel

    # the save that made step_2, with the manifest's read-back hashing reported: never a .pt
    reads = run[2]
    assert reads and not [r for r in reads if r.endswith(".pt")], reads

    copy = tmp_path / "run"
    shutil.copytree(run[0], copy)
    victim = copy / "step_2" / OPTIM
    data = bytearray(victim.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 64] = bytes(b ^ 0xFF for b in data[middle:middle + 64])
    victim.write_bytes(bytes(data))
    with pytest.raises(checkpoint.CheckpointError, match=f"{OPTIM} does not match its sha256"):
        checkpoint.verify(copy / "step_2")


def test_a_save_that_cannot_be_written_is_one_line_and_leaves_the_last_good_checkpoint(run, tmp_path):
    """Writing step_4 fails (a file-size limit stands in for a full disk: the same OSError path): exit 5, one line
    naming the cause and step_2, no temporary directory left; a resume without the limit goes on from step_2."""
    import resource

    copy = tmp_path / "run"
    shutil.copytree(run[0], copy)
    args = train_args(run[1], copy, "train.max_steps=4", "checkpoint.every=2", "train.dtype=bf16",
                      "parallel.zero_stage=1")

    def limit() -> None:  # files may not grow past 100 KB: the optimizer partition (~260 KB) cannot be written
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))

    p = subprocess.run([sys.executable, *args], cwd=REPO, env=child_env(), capture_output=True, text=True,
                       timeout=300, preexec_fn=limit)
    assert p.returncode == 5, p.stderr[-3000:]
    assert "Traceback" not in p.stderr, p.stderr[-3000:]
    line = [x for x in p.stderr.splitlines() if "could not write checkpoint step_4" in x]
    assert len(line) == 1 and "File too large" in line[0] and f"good checkpoint is {copy / 'step_2'}" in line[0], \
        p.stderr[-3000:]
    assert not list(copy.glob(".tmp_*")) and (copy / "latest").read_text().strip() == "step_2"

    again = run_python(args)
    assert again.returncode == 0 and f"resuming from {copy / 'step_2'}" in again.stderr, again.stderr[-3000:]


def test_a_background_save_writes_what_a_foreground_save_writes(tmp_path):
    """The host copy a background save writes from keeps the original's storage sharing (a tied weight and a
    view of a flat buffer are stored once, as torch.save stores them) and no longer follows the original."""
    flat = torch.arange(12, dtype=torch.float32)
    emb = torch.randn(8, 4)
    state = {"embed": emb, "head": emb, "views": [flat[:6], flat[6:].view(2, 3)], "step": 3}
    checkpoint_files.save(state, tmp_path / "foreground.pt")
    with checkpoint_files.deferred() as jobs:
        checkpoint_files.save(state, tmp_path / "background.pt")
    emb.zero_()  # training goes on and changes the weights before the writer thread runs
    flat.zero_()
    checkpoint_files.write_all(jobs)
    fg, bg = (tmp_path / "foreground.pt").stat().st_size, (tmp_path / "background.pt").stat().st_size
    assert abs(fg - bg) < 256, (fg, bg)  # the same tensors; only zip bookkeeping may differ
    back = checkpoint_files.load(tmp_path / "background.pt")
    assert back["embed"].untyped_storage().data_ptr() == back["head"].untyped_storage().data_ptr()
    assert back["embed"].abs().sum() > 0 and back["views"][1].tolist() == [[6.0, 7.0, 8.0], [9.0, 10.0, 11.0]]


def test_the_next_background_save_reuses_the_host_buffers(tmp_path):
    """The second save copies into the first one's host memory (no new allocation, no page faults), writes the
    new values, and a state that changed shape gets buffers of its own size."""
    weights, moments = torch.randn(64, 8), torch.randn(32)

    def stage(state: dict) -> list[int]:
        with checkpoint_files.deferred() as jobs:
            checkpoint_files.save(state, tmp_path / "step.pt")
        checkpoint_files.write_all(jobs)
        kept.append(jobs)  # held, so a fresh allocation could not land at the same address
        return [jobs[0][0][k].untyped_storage().data_ptr() for k in ("w", "m")]

    kept: list = []
    first = stage({"w": weights, "m": moments})
    weights.add_(1.0)
    second = stage({"w": weights, "m": moments})
    assert second == first
    assert torch.equal(checkpoint_files.load(tmp_path / "step.pt")["w"], weights)
    grown = torch.randn(64)
    third = stage({"w": weights, "m": grown})
    assert third[0] == first[0] and third[1] != first[1]
    assert torch.equal(checkpoint_files.load(tmp_path / "step.pt")["m"], grown)


def test_pinned_staging_locks_exactly_the_state_and_falls_back_to_pageable(monkeypatch):
    """Host buffers for GPU state are page-aligned mappings of their own, locked in place at their exact size
    (torch's pinned allocator would round each up to a power of two and keep it), unlocked when dropped, and
    pageable where the host refuses to lock (here: no CUDA driver or context at all)."""
    if not torch.cuda.is_available():  # no driver or no context: asked to pin, it stays pageable and works
        assert not checkpoint_files.HostBuffer(4096, pin=True).pinned
    locked: dict[int, int] = {}
    refuse = {"now": False}

    def pin(ptr: int, nbytes: int):
        if refuse["now"]:
            return None
        locked[ptr] = nbytes
        return "context"

    monkeypatch.setattr(checkpoint_files, "_pin", pin)
    monkeypatch.setattr(checkpoint_files, "_unpin", lambda ptr, context: locked.pop(ptr))
    sizes = [3 * 2**20 + 5, 1000, 2**20 + 1]  # none a power of two
    buffers = [checkpoint_files.HostBuffer(n, pin=True) for n in sizes]
    assert all(b.pinned for b in buffers) and sorted(locked.values()) == sorted(sizes)
    assert [b.storage.nbytes() for b in buffers] == sizes
    assert all(ptr % mmap.PAGESIZE == 0 for ptr in locked)  # pages of their own: no two locks overlap
    buffers[0].storage.copy_(torch.arange(sizes[0], dtype=torch.uint8).untyped_storage())  # writable
    del buffers
    assert locked == {}  # dropped buffers are unlocked
    refuse["now"] = True
    short = checkpoint_files.HostBuffer(4096, pin=True)
    assert not short.pinned and short.storage.nbytes() == 4096  # pageable: the save still works, slower
    assert not checkpoint_files.HostBuffer(4096, pin=False).pinned  # CPU state is never locked


@pytest.mark.gpu
def test_a_background_save_of_gpu_state_stages_it_in_pinned_memory(tmp_path):
    state = {"w": torch.randn(1024, 1024, device="cuda"), "step": 7}
    with checkpoint_files.deferred() as jobs:
        checkpoint_files.save(state, tmp_path / "gpu.pt")
    state["w"].zero_()  # the next step changes the weights while the writer thread runs
    staged = jobs[0][0]["w"]
    assert staged.is_pinned() and staged.device.type == "cpu" and staged.abs().sum() > 0
    assert checkpoint_files.STAGING.host_bytes == 1024 * 1024 * 4  # exactly the state, not a rounded block
    checkpoint_files.write_all(jobs)
    assert checkpoint_files.load(tmp_path / "gpu.pt")["w"].abs().sum() > 0
