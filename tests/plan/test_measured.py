"""The planner against measurements on 2 gloo ranks (one torchrun launch, ~30 s): saved activations of a
megatron-core TP=2 block, in-flight micro-batches of DeepSpeed's 1F1B pipeline (PP=2), and the model-state
tensors DeepSpeed allocates under ZeRO-0/1/2/3."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from plan_common import BATCH, SEQ, block_args, case_overrides
from spawn import torchrun
from pretrain.config import load_config
from pretrain.plan.describe import Kernels, block_activations, estimate, planned_run, stage_activations

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def measured(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("plan")
    torchrun(2, [str(Path(__file__).parent / "plan_worker.py"), str(out)], timeout=600)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


@pytest.mark.parametrize("mode", ["none", "selective", "full"])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_tp2_block_saved_bytes(measured, dtype, mode):
    planned = block_activations(block_args(), BATCH * SEQ, 2, False, mode, 4 if dtype == "fp32" else 2,
                                Kernels.cpu())[0]
    for rank in (0, 1):
        got = measured[rank]["tp2"][f"{dtype}_{mode}"]
        assert got == pytest.approx(planned, rel=0.10), f"rank {rank}: measured {got} vs planned {planned}"


@pytest.mark.parametrize("mode", ["none", "selective", "full"])
@pytest.mark.parametrize("dtype, zero", [("fp32", 0), ("bf16", 1)])
def test_pp2_in_flight_micro_batches(measured, dtype, zero, mode):
    """Stage 0 keeps 2 micro-batches alive (1F1B warm-up), stage 1 one plus the head."""
    cfg = load_config(None, case_overrides(pp=2, zero=zero, dtype=dtype, mode=mode))
    run = planned_run(cfg, 2)
    stages = stage_activations(cfg, run.layout, run.model, Kernels.cpu())
    assert [s.in_flight for s in stages] == [2, 1]
    for stage in stages:
        got = measured[stage.stage]["pp2"][f"{dtype}_{mode}"]
        assert got == pytest.approx(stage.saved, rel=0.10), f"stage {stage.stage}: {got} vs {stage.saved}"


@pytest.mark.parametrize("zero, dtype", [(0, "fp32"), (1, "bf16"), (2, "bf16"), (3, "bf16")])
def test_zero_model_states_match_deepspeed(measured, zero, dtype):
    e = estimate(load_config(None, case_overrides(zero=zero, dtype=dtype)), 2, kernels=Kernels.cpu())
    for rank in (0, 1):
        got = measured[rank]["zero"][f"zero{zero}_{dtype}"]
        assert got["states"] == pytest.approx(e.model_states, rel=0.05), f"rank {rank}: {got} vs {e.model_states}"
        assert got["bucket"] == (1_000_000_000 if zero == 3 else 0)
