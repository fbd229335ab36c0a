"""README's commands work in the order written, in a fresh working directory.

`make demo` trains into its own run dir on 2 ranks; README's next train line (one process, the same config) must
then start its own run, not be refused for resuming the demo's 2-rank checkpoint under another layout.
The demo's data steps are replaced by the tests' tiny shards at the paths the debug config names, and the demo's
training is cut to 2 steps; the commands themselves are the demo's (pretrain.demo) and README's own line.
"""
from __future__ import annotations

import shlex
import shutil
import subprocess
import sys

import pytest
from spawn import REPO, child_env
from train_common import tiny_shards

pytestmark = pytest.mark.slow  # runs the demo and README's train line


def _readme_line(prefix: str) -> list[str]:
    line = next(x for x in (REPO / "README.md").read_text().splitlines() if x.startswith(prefix))
    return shlex.split(line.split("#", 1)[0])


def test_readme_train_line_runs_after_the_demo(tmp_path):
    from pretrain.demo import train_command

    shards = tiny_shards(tmp_path / "data") / "shards"
    work = tmp_path / "work"
    shutil.copytree(REPO / "configs", work / "configs")
    (work / "runs" / "demo").mkdir(parents=True)
    for name in ("shards", "val_shards"):
        shutil.copytree(shards, work / "runs" / "demo" / name)
    small = ["--set", "train.max_steps=2", "--set", "model.n_layers=2", "--set", "train.seq_len=32",
             "--set", "tracking.enabled=false"]

    def run(cmd: list[str]) -> subprocess.CompletedProcess:
        return subprocess.run(cmd, cwd=work, env=child_env(), capture_output=True, text=True, timeout=400)

    demo = run(train_command(sys.executable) + small)
    assert demo.returncode == 0, demo.stderr[-3000:]
    readme = _readme_line("pretrain train --config configs/debug.yaml")
    assert readme[:2] == ["pretrain", "train"]
    p = run([sys.executable, "-m", "pretrain", *readme[1:]])
    assert p.returncode == 0, p.stderr[-3000:]
    assert "starting fresh at step 0; world 1" in p.stderr
