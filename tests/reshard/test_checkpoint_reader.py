"""The offline reader gives back exactly what the live engine holds, whatever layout wrote the checkpoint.

Oracles: `Engine.reference_state_dict()` (the live, consolidated module weights) for fp32 layouts, and DeepSpeed's
own `safe_get_full_fp32_param` / `safe_get_full_optimizer_state` (fp32 master weight and Adam moments, gathered
over ZeRO partitions by DeepSpeed) for layouts without TP/PP, bf16 included. Equality is exact: the reader only
copies bytes, it computes nothing.
"""
from __future__ import annotations

import pytest
import torch

from pretrain.checkpoint import CheckpointError
from pretrain.model import Transformer
from pretrain.parallel.checkpoint_reader import CheckpointReader

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
