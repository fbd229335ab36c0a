"""A run directory that a planted or edited file cannot turn against its owner (issue 23, findings 1-4).

One real 1-rank run checkpointed at steps 2 and 4 (the session's shared plain run, tests/train/shared_runs.py);
each test damages its own copy, with the
manifest re-hashed where it vouches for the file, so what stops the damage is the validation, not the hash:
- `latest` that leads out of the run (relative or absolute, a symlink): resume `auto` resumes this run's own
  newest step (never the foreign one, step_4 kept, metrics.jsonl not cut); `generate --checkpoint RUN` refuses;
- meta.json that is no valid record (bad step, extra key, invalid JSON, garbage resolved, a layout count that is
  no number), or that names another tokenizer than the shards': one line naming the file and the field;
- a truncated or foreign rank file or DeepSpeed file: one line naming the file;
- manifest entries outside the step directory, symlinks and unlisted files in it: refused before any file is
  opened or hashed.
The CLI (`pretrain train`, `pretrain generate`) runs end to end for a few cases (exit 2, one `error:` line);
the rest calls checkpoint.verify / choose / load / read_meta directly.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch

from shared import copy_of
from shared_runs import plain_run
from train_common import Solo, run_python, train_args

from pretrain import checkpoint
from pretrain.checkpoint import files as checkpoint_files
from pretrain.cli import main as cli

pytestmark = pytest.mark.slow

RANK = "rank_00000.pt"
MODEL = "model/mp_rank_00_model_states.pt"


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    """(run dir checkpointed at steps 2 and 4, its shards): the session's shared plain run, never written to."""
    run, shards = plain_run(tmp_path_factory)
    assert checkpoint.list_steps(run) == [2, 4]
    return run, shards


@pytest.fixture
def run(trained, tmp_path) -> Path:
    """This test's own copy of the run."""
    return copy_of(trained[0], tmp_path / "run")


def rehash(step: Path, rel: str) -> None:
    """The manifest entry of `rel` made to vouch for the file's bytes as they are now."""
    manifest = json.loads((step / "manifest.json").read_text())
    data = (step / rel).read_bytes()
    manifest["files"][rel] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (step / "manifest.json").write_text(json.dumps(manifest))


def edit_meta(step: Path, change) -> None:
    """meta.json as `change(dict)` returns it (or raw text), re-hashed in the manifest."""
    meta = json.loads((step / "meta.json").read_text())
    new = change(meta)
    (step / "meta.json").write_text(new if isinstance(new, str) else json.dumps(new))
    rehash(step, "meta.json")


def one_error_line(err: str) -> str:
    lines = [x for x in err.splitlines() if x.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    return lines[0]


def metric_steps(run: Path) -> list[int]:
    return [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]


# ---------------------------------------------------------------------------------------- 1. `latest`


def _foreign(run: Path) -> Path:
    """Another run's verifying checkpoint beside this one (a copy of step_2 in ../elsewhere)."""
    other = run.parent / "elsewhere" / "step_2"
    shutil.copytree(run / "step_2", other)
    return other


LATEST_CASES = {
    "relative": lambda run: "../elsewhere/step_2",
    "absolute": lambda run: str(run.parent / "elsewhere" / "step_2"),
    "dotted": lambda run: "step_4/../../elsewhere/step_2",
    "not_a_step": lambda run: "model",
}


@pytest.mark.parametrize("case", LATEST_CASES)
def test_resume_auto_never_follows_a_latest_that_leaves_the_run(run, case, capsys):
    _foreign(run)
    (run / "latest").write_text(LATEST_CASES[case](run) + "\n")
    assert checkpoint.choose(run, "auto", Solo()) == run / "step_4", "this run's own newest checkpoint"
    assert "refusing: " in capsys.readouterr().err
    with pytest.raises(checkpoint.CheckpointError, match=r"/latest: holds .* not the bare name of a step"):
        checkpoint.resolve_checkpoint_arg(run)


def test_a_latest_or_step_dir_that_is_a_symlink_is_not_followed(run, capsys):
    other = _foreign(run)
    (run / "step_9").symlink_to(other, target_is_directory=True)  # the newest "step" leads out of the run
    (run / "latest").unlink()
    assert checkpoint.choose(run, "auto", Solo()) == run / "step_4"
    assert "step_9: is a symlink" in capsys.readouterr().err
    (run / "latest").write_text("step_9\n")
    assert checkpoint.choose(run, "auto", Solo()) == run / "step_4"
    with pytest.raises(checkpoint.CheckpointError, match="step_9: is a symlink"):
        checkpoint.resolve_checkpoint_arg(run)
    (run / "latest").unlink()
    (run / "latest").symlink_to(other.parent / "latest_elsewhere")
    (other.parent / "latest_elsewhere").write_text("step_4\n")
    with pytest.raises(checkpoint.CheckpointError, match="latest: not a regular file"):
        checkpoint.resolve_checkpoint_arg(run)


def test_train_and_generate_with_a_foreign_latest(run, trained, capfd):
    """End to end: the resume goes on from this run's step_4 (kept, metrics.jsonl whole), generate refuses."""
    _foreign(run)
    (run / "latest").write_text("../elsewhere/step_2\n")
    before = (run / "step_4" / "manifest.json").read_bytes()
    p = run_python(train_args(trained[1], run, "train.max_steps=4", "checkpoint.every=2"))
    assert p.returncode == 0, p.stderr[-3000:]
    assert f"resuming from {run / 'step_4'} at step 4" in p.stderr, p.stderr[-3000:]
    assert (run / "step_4" / "manifest.json").read_bytes() == before, "step_4 replaced"
    assert metric_steps(run) == [1, 2, 3, 4], "metrics.jsonl cut back"

    (run / "latest").write_text(str(run.parent / "elsewhere" / "step_2") + "\n")
    assert cli(["generate", "--checkpoint", str(run), "--prompt", "the", "--max-new-tokens", "2"]) == 2
    assert f"{run / 'latest'}: holds" in one_error_line(capfd.readouterr().err)


# ------------------------------------------------------------------------------------- 2. meta.json

META_CASES = {
    "negative_step": (lambda m: {**m, "step": -5}, r"field step must be a whole number >= 0, not -5"),
    "string_step": (lambda m: {**m, "step": "abc"}, r"field step must be a whole number >= 0, not 'abc'"),
    "huge_float_step": (lambda m: {**m, "step": 1e30}, r"field step must be a whole number >= 0, not 1e\+30"),
    "bool_step": (lambda m: {**m, "step": True}, r"field step must be a whole number >= 0, not True"),
    "other_step": (lambda m: {**m, "step": 2}, r"field step is 2, but the directory is step_4"),
    "no_step": (lambda m: {k: v for k, v in m.items() if k != "step"}, r"field step is missing"),
    "extra_key": (lambda m: {**m, "surprise": 1}, r"field 'surprise' is not a meta.json field"),
    "invalid_json": (lambda m: json.dumps(m)[:-7], r"unreadable \(JSONDecodeError"),
    "not_an_object": (lambda m: [m], r"not a JSON object"),
    "garbage_resolved": (lambda m: {**m, "resolved": "garbage"}, r"field resolved must be an object"),
    "resolved_missing_keys": (lambda m: {**m, "resolved": {"layout": m["layout"]}}, r"field resolved.model is missing"),
    "resolved_bad_model": (lambda m: {**m, "resolved": {**m["resolved"], "model": {**m["resolved"]["model"],
                                                                                     "dim": -8}}},
                           r"field resolved.model.dim must be a whole number >= 1, not -8"),
    "layout_tp_text": (lambda m: {**m, "layout": {**m["layout"], "tp": "x"}},
                       r"field layout.tp must be a whole number >= 1, not 'x'"),
    "layout_disagrees": (lambda m: {**m, "layout": {**m["layout"], "dp": 2, "world": 2}},
                         r"field layout disagrees with resolved.layout"),
    "run_id_number": (lambda m: {**m, "mlflow_run_id": 5}, r"field mlflow_run_id must be a string or null"),
    "tokenizer_disagrees": (lambda m: {**m, "tokenizer": {**m["tokenizer"], "identity": "0" * 64}},
                            r"field tokenizer.identity 000000000000 disagrees with resolved.tokenizer.identity"),
}


@pytest.mark.parametrize("case", META_CASES)
def test_meta_json_is_a_typed_record(run, case):
    change, message = META_CASES[case]
    step = run / "step_4"
    edit_meta(step, change)
    for check in (checkpoint.verify, checkpoint.read_meta):
        with pytest.raises(checkpoint.CheckpointError, match=rf"step_4/meta.json: .*{message}"):
            check(step)
    assert checkpoint.choose(run, "auto", Solo()) == run / "step_2", "auto falls back past the refused step"


def test_a_negative_step_is_one_line_and_exit_2(run, trained):
    """The issue's worst case: step -5 retrained from step -4, rewrote every step dir and segfaulted at exit."""
    for step in (run / "step_2", run / "step_4"):
        edit_meta(step, lambda m: {**m, "step": -5})
    p = run_python(train_args(trained[1], run, "train.max_steps=6", "checkpoint.every=2"))
    assert p.returncode == 2
    assert "step_4/meta.json: field step must be a whole number >= 0, not -5" in one_error_line(p.stderr)
    assert checkpoint.list_steps(run) == [2, 4] and metric_steps(run) == [1, 2, 3, 4]


def _other_tokenizer(step: Path) -> None:
    """meta.json says the checkpoint was trained with another tokenizer (consistently, in both records)."""
    def change(m):
        m["tokenizer"]["identity"] = "f" * 64
        m["resolved"]["tokenizer"]["identity"] = "f" * 64
        return m
    edit_meta(step, change)


def test_a_resume_with_shards_of_another_tokenizer_is_refused(run, trained):
    _other_tokenizer(run / "step_4")
    checkpoint.verify(run / "step_4")  # a consistent record: only the comparison with the shards can tell
    p = run_python(train_args(trained[1], run, "train.max_steps=4", "checkpoint.every=2"))
    assert p.returncode == 2, p.stderr[-3000:]
    line = one_error_line(p.stderr)
    assert "step_4/meta.json: field tokenizer.identity ffffffffffff is not the tokenizer the shards" in line
    assert "model.init_from_any_tokenizer=true" in line


def test_the_tokenizer_opt_in_lets_a_resume_go_on(run):
    from pretrain.checkpoint.resume import check_tokenizer
    from pretrain.run.resolved import ResolvedRun

    ours = checkpoint.run_of(run / "step_2")
    _other_tokenizer(run / "step_4")
    with pytest.raises(checkpoint.CheckpointError, match="is not the tokenizer the shards"):
        check_tokenizer(run / "step_4", ours, any_tokenizer=False)
    check_tokenizer(run / "step_4", ours, any_tokenizer=True)
    check_tokenizer(run / "step_2", ours, any_tokenizer=False)


# ----------------------------------------------------------------------------- 3. unreadable files


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


DAMAGE = {
    "truncated": _truncate,
    "empty": lambda p: p.write_bytes(b""),
    "not_torch": lambda p: p.write_bytes(b"not a checkpoint at all\n" * 8),
    "wrong_type": lambda p: torch.save([1, 2, 3], p),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_an_unreadable_rank_file_is_one_line(run, damage):
    step = run / "step_4"
    DAMAGE[damage](step / RANK)
    rehash(step, RANK)
    checkpoint.verify(step)
    with pytest.raises(checkpoint.CheckpointError, match=rf"step_4/{RANK}: (cannot be read|holds a list)"):
        checkpoint.load(step, Solo(), load_model=lambda d: None)


def test_a_rank_file_without_its_fields_is_one_line(run):
    step = run / "step_4"
    state = checkpoint_files.load(step / RANK)
    for key, message in (("rng", "field rng is missing"), ("step", "field step is 2, but meta.json says 4")):
        broken = {k: v for k, v in state.items() if k != key} if key == "rng" else {**state, "step": 2}
        torch.save(broken, step / RANK)
        rehash(step, RANK)
        with pytest.raises(checkpoint.CheckpointError, match=rf"{RANK}: {message}"):
            checkpoint.load(step, Solo(), load_model=lambda d: None)


@pytest.mark.parametrize("damage", ["truncated", "wrong_type"])
def test_an_unreadable_deepspeed_file_is_one_line_offline(run, damage, capfd):
    step = run / "step_4"
    DAMAGE[damage](step / MODEL)
    rehash(step, MODEL)
    from pretrain.checkpoint.reader import CheckpointReader

    with pytest.raises(checkpoint.CheckpointError, match="mp_rank_00_model_states.pt: "):
        CheckpointReader(step)
    assert cli(["generate", "--checkpoint", str(step), "--prompt", "the", "--max-new-tokens", "2"]) == 2
    assert "mp_rank_00_model_states.pt: " in one_error_line(capfd.readouterr().err)


def test_a_truncated_rank_file_stops_a_resume_in_one_line(run, trained):
    step = run / "step_4"
    _truncate(step / RANK)
    rehash(step, RANK)
    p = run_python(train_args(trained[1], run, "train.max_steps=6", "checkpoint.every=2"))
    assert p.returncode == 2
    assert f"step_4/{RANK}: cannot be read" in one_error_line(p.stderr)


# ------------------------------------------------------------------------- 4. paths, symlinks


@pytest.mark.parametrize("entry", ["../../../../etc/passwd", "/etc/hostname", "model/../../step_2/meta.json",
                                   "./meta.json", ""])
def test_a_manifest_entry_outside_the_step_is_refused_before_anything_is_opened(run, entry, monkeypatch, capsys):
    step = run / "step_4"
    manifest = json.loads((step / "manifest.json").read_text())
    manifest["files"][entry] = {"size": 1, "sha256": "0" * 64}
    (step / "manifest.json").write_text(json.dumps(manifest))
    hashed: list[Path] = []
    real = checkpoint.commit._sha256
    monkeypatch.setattr(checkpoint.commit, "_sha256", lambda p: (hashed.append(p), real(p))[1])
    with pytest.raises(checkpoint.CheckpointError, match=r"manifest.json: file entry .* (leads outside|is not a)"):
        checkpoint.verify(step)
    assert hashed == [], "a file was hashed before the manifest's paths were checked"
    assert checkpoint.choose(run, "auto", Solo()) == run / "step_2"
    assert "refusing: " in capsys.readouterr().err


@pytest.mark.parametrize("what", [RANK, "model"])
def test_a_symlink_in_a_step_is_refused_even_to_identical_bytes(run, what):
    """The link points at an exact copy outside the step, so sizes and hashes all match: only the link tells."""
    step = run / "step_4"
    outside = run.parent / "outside" / what
    outside.parent.mkdir()
    shutil.move(step / what, outside)
    (step / what).symlink_to(outside, target_is_directory=outside.is_dir())
    with pytest.raises(checkpoint.CheckpointError, match=rf"step_4: {what} is a symlink"):
        checkpoint.verify(step)


def test_a_file_the_manifest_does_not_list_is_refused(run):
    """DeepSpeed and the reader find some files by name: one planted beside the vouched ones would be read."""
    step = run / "step_4"
    shutil.copy(step / MODEL, step / "model" / "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt")
    with pytest.raises(checkpoint.CheckpointError, match="bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt is not in"):
        checkpoint.verify(step)
