"""Bad input to the `pretrain` and `pretrain-data` commands is one line and exit 2, or a correct result: never a
traceback, never a silent wrong result."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from spawn import REPO, child_env
from shared_runs import plain_run

from pretrain.cli import main as cli

pytestmark = pytest.mark.slow


def _one_line(err: str) -> str:
    lines = [x for x in err.splitlines() if x.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    return lines[0]


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished 1-rank run without tracking (the session's shared plain run: read here, never written to)."""
    return plain_run(tmp_path_factory)[0]


def test_generate_and_export_arguments(finished, tmp_path, capfd):
    long_prompt = "word " * 2000  # far beyond the debug model's context
    assert cli(["generate", "--checkpoint", str(finished), "--prompt", long_prompt]) == 2
    assert "is longer than the model's context" in _one_line(capfd.readouterr().err)

    with pytest.raises(SystemExit) as e:
        cli(["generate", "--checkpoint", str(finished), "--prompt", "a", "--max-new-tokens", "-1"])
    assert e.value.code == 2 and "--max-new-tokens: -1 is not a positive whole number" in capfd.readouterr().err

    # the run's `latest` file names the newest step: taken as that step
    assert cli(["generate", "--checkpoint", str(finished / "latest"), "--prompt", "the", "--max-new-tokens", "2",
                "--temperature", "0"]) == 0
    capfd.readouterr()

    # registering needs the MLflow run that trained the checkpoint: refused before anything is exported
    assert cli(["export-hf", "--checkpoint", str(finished), "--out", str(tmp_path / "hf"), "--register", "m"]) == 2
    assert "was trained without MLflow tracking" in _one_line(capfd.readouterr().err)
    assert not (tmp_path / "hf").exists()

    a_file = tmp_path / "model.bin"
    a_file.write_text("x")
    assert cli(["export-hf", "--checkpoint", str(finished), "--out", str(a_file)]) == 2
    assert f"{a_file} is a file" in _one_line(capfd.readouterr().err)


def test_a_config_that_is_not_utf8(tmp_path, capfd):
    bad = tmp_path / "bad.yaml"
    bad.write_bytes(b"model:\n  flavor: debug # caf\xe9\n")
    assert cli(["train", "--config", str(bad), "--dry-run"]) == 2
    assert f"{bad} line 2: not UTF-8 text (byte 0xe9)" in _one_line(capfd.readouterr().err)


def test_a_tokenizer_from_an_empty_corpus(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    p = subprocess.run([sys.executable, "-m", "data_pipeline", "train-tokenizer", "--input", str(empty),
                        "--vocab-size", "300", "--out", str(tmp_path / "tok")], cwd=REPO, env=child_env(),
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "no text to train a tokenizer on" in p.stderr, p.stderr[-2000:]
    assert "Traceback" not in p.stderr and not (tmp_path / "tok" / "tokenizer.json").exists()


def test_a_checkpoint_dir_that_cannot_be_written_fails_the_dry_run(tmp_path, capfd):
    """The dry run checks where the run will write (a file where a directory must go stands in for a read-only
    mount: as root, permission bits do not stop a write)."""
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("x")
    config = str(REPO / "configs" / "debug.yaml")
    assert cli(["train", "--config", config, "--set", f"checkpoint.dir={blocker / 'run'}", "--set",
                "tracking.enabled=false", "--dry-run"]) == 2
    assert f"checkpoint.dir {blocker / 'run'}: {blocker} is not a writable directory" in \
        _one_line(capfd.readouterr().err)
