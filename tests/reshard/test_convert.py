"""`pretrain convert-checkpoint --to universal`: DeepSpeed's universal files from a checkpoint of any layout."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from pretrain.checkpoint.reader import CheckpointReader
from pretrain.cli import main as cli
from spawn import REPO, child_env


def _convert(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pretrain", "convert-checkpoint", *args], cwd=REPO, env=child_env(),
                          capture_output=True, text=True, timeout=300)


@pytest.mark.distributed
def test_convert_to_universal_writes_whole_tensors_deepspeed_can_reslice(sources, tmp_path):
    out_dir, _ = sources
    step = out_dir / "pp2_tp2" / "step_6"  # 4 ranks: pipeline stages and TP shards, ZeRO-0
    proc = _convert("--checkpoint", str(step), "--to", "universal", "--out", str(tmp_path / "ucp"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr == "", proc.stderr  # no library start-up noise
    reader = CheckpointReader(step)
    info = json.loads((tmp_path / "ucp" / "universal.json").read_text())
    assert info["names"] == reader.names() and info["optimizer_step"] == 6
    rows = reader.run.vocab_size
    for name in reader.names():
        folder = tmp_path / "ucp" / "zero" / name
        for kind, fname in (("param", "fp32"), ("exp_avg", "exp_avg"), ("exp_avg_sq", "exp_avg_sq")):
            entry = torch.load(folder / f"{fname}.pt", weights_only=False)
            want = reader.tensor(name, kind)
            if name in ("tok_embeddings.weight", "output.weight"):  # padding cut: DeepSpeed re-pads per TP degree
                assert entry["vocab_tensor"] is True and torch.equal(entry["param"], want[:rows])
            else:
                assert torch.equal(entry["param"], want)
            # DeepSpeed's loader cuts TP pieces with chunk(tp, cat_dim): the split megatron-core made.
            if name.endswith(("wq.weight", "w1.weight")):
                assert entry["cat_dim"] == 0
            elif name.endswith(("wo.weight", "w2.weight")):
                assert entry["cat_dim"] == 1
            elif name.endswith("norm.weight"):
                assert "cat_dim" not in entry  # replicated: loaded whole
        assert float(torch.load(folder / "step.pt", weights_only=False)) == 6.0


def test_convert_refuses_what_it_cannot_do(tmp_path, capsys):
    """In this process (the CLI's own main): a fresh process's start-up output is what the conversion above checks."""
    code = cli(["convert-checkpoint", "--checkpoint", str(tmp_path / "nope"), "--to", "universal",
                "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and err.strip().count("\n") == 0 and "does not exist" in err, err
    with pytest.raises(SystemExit) as helped:
        cli(["convert-checkpoint", "--help"])
    assert helped.value.code == 0 and "--to {universal}" in capsys.readouterr().out
