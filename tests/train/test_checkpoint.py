"""The checkpoint commit protocol (DESIGN.md reliability contract), without an engine: 2 real gloo ranks."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from spawn import torchrun
from train_common import Solo
from pretrain import checkpoint as ckpt


def _save(run_dir: Path, step: int, keep: int = 3) -> Path:
    return ckpt.save(run_dir, step, Solo(), save_model=lambda d: (d / "model.bin").write_bytes(b"w" * 100),
                     rank_state={"loader": {}}, meta=ckpt.Meta(step=step), config_yaml="a: 1\n", keep=keep)


@pytest.mark.distributed
def test_two_ranks_commit_resume_and_fallback(tmp_path):
    proc = torchrun(2, ["tests/train/ckpt_worker.py", str(tmp_path / "run")], timeout=180)
    results = [json.loads((tmp_path / f"result_{rank}.json").read_text()) for rank in (0, 1)]
    for r in results:
        assert r["chosen"] == "step_3" and r["loaded_step"] == 3 and r["load_called_with"] == ["step_3"]
        assert r["cursor"] == 30 + r["rank"], "each rank must get back its own loader cursor"
        assert r["rng_restored"], "RNG streams after load must continue exactly as after the save"
        assert r["steps_on_disk"] == [2, 3], "keep=2 prunes the oldest"
        assert r["fallback"] == "step_2", "a corrupt newest checkpoint must make auto fall back"
        assert "step_3 is corrupt: model_rank1.pt has" in r["explicit"]
    assert "refusing: checkpoint" in proc.stderr and "falling back to the previous complete checkpoint" in proc.stderr
    run = tmp_path / "run"
    assert (run / "latest").read_text().strip() == "step_3"
    manifest = json.loads((run / "step_2" / "manifest.json").read_text())
    assert {"rank_00000.pt", "rank_00001.pt", "model_rank0.pt", "model_rank1.pt", "config.yaml", "meta.json"} \
        <= set(manifest["files"])


def test_incomplete_checkpoint_refused_and_never_fresh_over_broken_run(tmp_path):
    run = tmp_path / "run"
    _save(run, 5)
    (run / "step_5" / "manifest.json").unlink()  # as if the save died before the commit
    with pytest.raises(ckpt.CheckpointError, match=r"step_5 is incomplete: no manifest.json"):
        ckpt.choose(run, str(run / "step_5"), Solo())
    # auto must not silently start from random weights when checkpoints exist but none is usable
    with pytest.raises(ckpt.CheckpointError, match="no complete checkpoint .* checkpoint.resume=none"):
        ckpt.choose(run, "auto", Solo())
    assert ckpt.choose(run, "none", Solo()) is None
    assert ckpt.choose(tmp_path / "empty", "auto", Solo()) is None


def test_missing_file_and_bitflip_are_detected(tmp_path):
    run = tmp_path / "run"
    _save(run, 1)
    _save(run, 2)
    flipped = bytearray((run / "step_2" / "model.bin").read_bytes())
    flipped[0] ^= 1
    (run / "step_2" / "model.bin").write_bytes(bytes(flipped))
    with pytest.raises(ckpt.CheckpointError, match="model.bin does not match its sha256"):
        ckpt.verify(run / "step_2")
    (run / "step_1" / "rank_00000.pt").unlink()
    with pytest.raises(ckpt.CheckpointError, match="rank_00000.pt is missing"):
        ckpt.verify(run / "step_1")
    with pytest.raises(ckpt.CheckpointError, match="no complete checkpoint"):
        ckpt.choose(run, "auto", Solo())


def test_latest_points_at_newest_and_resave_replaces(tmp_path):
    run = tmp_path / "run"
    for s in (1, 2, 3, 4):
        _save(run, s, keep=2)
    assert ckpt.list_steps(run) == [3, 4]
    assert (run / "latest").read_text().strip() == "step_4"
    _save(run, 4, keep=2)  # same step again: replaced whole, still verifies
    ckpt.verify(run / "step_4")
    assert not list(run.glob(".tmp_*")) and not list(run.glob(".latest*"))
    assert ckpt.resolve_checkpoint_arg(run) == run / "step_4"


def test_checkpoint_copies_the_tokenizers_own_files_only(tmp_path):
    """data.tokenizer may name a transformers model directory: the checkpoint's tokenizer/ gets the tokenizer's
    files (the one list export-hf and import-hf use too), not the model's config.json or index beside them."""
    from data_pipeline.tokenizer import load_tokenizer, train_bpe
    from pretrain.run.resolved import TokenizerFacts
    from pretrain.checkpoint.manager import copy_tokenizer

    src = tmp_path / "hf_model"
    train_bpe(["the model data token train loss step rank shard layer"] * 20, 300, str(src))
    (src / "config.json").write_text("{}")
    (src / "model.safetensors.index.json").write_text("{}")
    tok = load_tokenizer(str(src))
    step = tmp_path / "step_1"
    step.mkdir()
    copy_tokenizer(TokenizerFacts(identity=tok.identity, kind=tok.kind, vocab_size=tok.vocab_size,
                                  eos_id=tok.eos_id, path=str(src)), step)
    copied = step / ckpt.TOKENIZER_DIR
    assert sorted(p.name for p in copied.iterdir()) == sorted(p.name for p in src.iterdir()
                                                               if p.name not in ("config.json",
                                                                                 "model.safetensors.index.json"))
    assert load_tokenizer(str(copied)).identity == tok.identity
