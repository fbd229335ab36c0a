"""What counts as a layout change, and which old rank's files a new rank continues from (no launch needed)."""
from __future__ import annotations

import dataclasses

import pytest

from pretrain.checkpoint import CheckpointError
from pretrain.config import load_config
from pretrain.checkpoint.reshard import check_same_model, needs_reslicing
from pretrain.run.resolved import layout_words
from pretrain.run.resolved import resolve_run

BASE = ["model.flavor=debug", "model.vocab_size=300", "train.micro_batch_size=2", "train.grad_accum=2"]


def _run(world: int, *overrides: str):
    return resolve_run(load_config(None, BASE + list(overrides)), world, require_data=False)


def test_layout_change_is_what_deepspeeds_own_load_cannot_take():
    dp2 = _run(2, "parallel.zero_stage=2")
    assert not needs_reslicing(dp2, _run(2, "parallel.zero_stage=2"))
    assert needs_reslicing(dp2, _run(2, "parallel.zero_stage=1"))  # ZeRO stage
    assert needs_reslicing(dp2, _run(1, "parallel.zero_stage=2"))  # dp
    assert needs_reslicing(dp2, _run(2, "parallel.zero_stage=2", "train.dtype=bf16"))  # dtype
    tp2 = _run(2, "parallel.tp=2")
    assert needs_reslicing(dp2, tp2) and tp2.layout.padded_vocab_size != dp2.layout.padded_vocab_size
    assert layout_words(tp2) == "tp 2 x pp 1 x dp 1 ZeRO-0"
    cp2 = _run(2, "parallel.cp=2", "parallel.zero_stage=2")  # ZeRO partitions over dp x cp: 2 either way
    assert needs_reslicing(dp2, cp2) and layout_words(cp2) == "tp 1 x cp 2 x pp 1 x dp 1 ZeRO-2"


def test_a_new_rank_continues_an_old_rank_of_its_dp_index():
    tp2_dp2 = _run(4, "parallel.tp=2").layout  # old ranks: (tp, dp) = 0:(0,0) 1:(1,0) 2:(0,1) 3:(1,1)
    assert [tp2_dp2.stream_rank(d) for d in range(2)] == [0, 2]
    assert _run(2, "parallel.pp=2").layout.stream_rank(0) == 0
    # megatron-core's order tp-cp-dp-pp: DP index d starts at rank d x tp x cp; its CP peers read the same stream
    assert [_run(8, "parallel.tp=2", "parallel.cp=2").layout.stream_rank(d) for d in range(2)] == [0, 4]


def test_only_the_layout_may_change(tmp_path):
    args = _run(1).model
    check_same_model(args, dataclasses.replace(args, vocab_size=512, max_seq_len=4096), tmp_path)
    with pytest.raises(CheckpointError, match=r"another model \(dim 64 -> 128, hidden_dim 192 -> 352\)"):
        check_same_model(args, dataclasses.replace(args, dim=128), tmp_path)


def test_checkpoint_without_a_resolved_run_resumes_only_on_its_own_layout(tmp_path):
    """A step written before meta.json held the resolved run cannot be re-sliced (nothing says what it holds): on
    another tp/pp/dp it is refused in one line, as the rank-file check did before re-slicing existed, instead of
    being handed to DeepSpeed's same-layout load; on its own layout it loads as before."""
    import json

    from pretrain.checkpoint.resume import saved_run

    dp2 = _run(2, "parallel.zero_stage=2")
    (tmp_path / "meta.json").write_text(json.dumps({"step": 4, "layout": dataclasses.asdict(dp2.layout)}))
    assert saved_run(tmp_path, dp2) is None
    with pytest.raises(CheckpointError, match=r"older version .* tp 1 x pp 1 x dp 2; it can resume only on that "
                                              r"layout, not on tp 1 x pp 1 x dp 1"):
        saved_run(tmp_path, _run(1, "parallel.zero_stage=2"))
    # its layout has no cp (there was none): cp 1, so the same tp/pp/dp with cp 2 is another layout too
    old = {k: v for k, v in dataclasses.asdict(dp2.layout).items() if k != "cp"}
    (tmp_path / "meta.json").write_text(json.dumps({"step": 4, "layout": old}))
    assert saved_run(tmp_path, dp2) is None
    with pytest.raises(CheckpointError, match=r"not on tp 1 x cp 2 x pp 1 x dp 2"):
        saved_run(tmp_path, _run(4, "parallel.zero_stage=2", "parallel.cp=2"))
