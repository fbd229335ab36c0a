"""The offline reader gives back exactly what the live engine holds, whatever layout wrote the checkpoint.

Oracles: `Engine.reference_state_dict()` (the live, consolidated module weights) for fp32 layouts, and DeepSpeed's
own `safe_get_full_fp32_param` / `safe_get_full_optimizer_state` (fp32 master weight and Adam moments, gathered
over ZeRO partitions by DeepSpeed) for layouts without TP/PP, bf16 included. Equality is exact: the reader only
copies bytes, it computes nothing.
"""
from __future__ import annotations

import gc
from pathlib import Path

import pytest
import torch

from pretrain.checkpoint import CheckpointError
from pretrain.model import Transformer
from pretrain.checkpoint.reader import CheckpointReader

from conftest import SOURCES


FP32 = [c["name"] for cases in SOURCES.values() for c in cases if "bf16" not in c["name"]]
ALL = [c["name"] for cases in SOURCES.values() for c in cases]


def _reader(sources, name: str) -> tuple[CheckpointReader, dict]:
    out, results = sources
    assert "error" not in results[name], results[name].get("error")
    return CheckpointReader(out / name / "step_6"), torch.load(out / f"{name}.oracle.pt")


@pytest.mark.distributed
@pytest.mark.parametrize("name", FP32)
def test_reader_reproduces_reference_state_dict(sources, name):
    reader, oracle = _reader(sources, name)
    ref = oracle["reference"]
    with torch.device("meta"):
        model_order = [n for n, _ in Transformer(reader.run.model).named_parameters()]
    assert reader.names() == model_order
    assert set(reader.names()) == set(ref)
    for key in reader.names():
        got = reader.tensor(key)
        assert got.dtype == torch.float32 and torch.equal(got, ref[key]), f"{name}: {key} differs"
    assert reader.optimizer_step() == 6


@pytest.mark.distributed
@pytest.mark.parametrize("name", [n for n in ALL if not n.startswith(("tp", "pp"))])
def test_reader_gives_master_weights_and_moments(sources, name):
    """Under bf16 "param" is the fp32 master from the ZeRO partitions (not the bf16 module copy)."""
    reader, oracle = _reader(sources, name)
    for key, live in oracle["live"].items():
        for kind in ("param", "exp_avg", "exp_avg_sq"):
            assert torch.equal(reader.tensor(key, kind), live[kind]), f"{name}: {key} {kind} differs"
    if "bf16" in name:  # the module copy is the master rounded to bf16, and the master is not bf16-representable
        key = "layers.0.attention.wq.weight"
        master = reader.tensor(key)
        assert torch.equal(master.bfloat16().float(), oracle["reference"][key])
        assert not torch.equal(master, oracle["reference"][key])


@pytest.mark.distributed
def test_reader_refuses_an_incomplete_checkpoint(sources, tmp_path):
    import shutil

    out, _ = sources
    broken = tmp_path / "step_6"
    shutil.copytree(out / "dp2_zero2" / "step_6", broken)
    next(broken.glob("model/*optim_states.pt")).unlink()
    with pytest.raises(CheckpointError, match="is missing"):
        CheckpointReader(broken)


def _resident_file_bytes(directory) -> int:
    """Resident bytes of this process's mappings of files under `directory` (Linux /proc/self/smaps)."""
    total, ours = 0, False
    prefix = str(directory.resolve()) + "/"
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()
        if not head[0].endswith(":"):  # a mapping's header: address perms offset dev inode [path]
            ours = len(head) >= 6 and head[5].startswith(prefix)
        elif ours and head[0] == "Rss:":
            total += int(head[1]) * 1024
    return total


@pytest.mark.distributed
@pytest.mark.parametrize("name", ["dp2_zero1_bf16", "dp2_zero3_bf16", "pp2"])
def test_reader_unmaps_the_checkpoint_after_its_budget(sources, name):
    """A reader that has read its map budget lets go of every file mapping, so reading a checkpoint larger than
    the budget keeps at most the budget (plus one parameter) of it resident, not the whole checkpoint, even while
    the caller holds on to what it read; the values are unchanged."""
    out, results = sources
    assert "error" not in results[name], results[name].get("error")
    step_dir = out / name / "step_6"
    kinds = ("param", "exp_avg", "exp_avg_sq")
    whole = CheckpointReader(step_dir, map_budget=1 << 40)  # never unmaps: the old behaviour
    expected = {(k, kind): whole.tensor(k, kind) for k in whole.names() for kind in kinds}
    kept = _resident_file_bytes(step_dir)
    assert kept > 0
    del whole
    gc.collect()
    assert _resident_file_bytes(step_dir) == 0
    budget = sum(t.numel() * 4 for t in expected.values()) // 8
    reader = CheckpointReader(step_dir, map_budget=budget)
    held, drops = [], 0
    for (key, kind), value in expected.items():
        held.append(reader.tensor(key, kind))
        assert torch.equal(held[-1], value), f"{name}: {key} {kind}"
        assert reader.mapped_bytes <= budget
        if reader.mapped_bytes == 0:  # it has just let go of its files: none of their pages may stay mapped
            drops += 1
            assert _resident_file_bytes(step_dir) == 0, f"{name}: a mapping outlived the reader's files"
    assert drops >= 4, f"{name}: {drops} unmaps while reading 8 budgets' worth"
