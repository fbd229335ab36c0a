"""`pretrain average` on two real checkpoints of one model trained on different layouts (TP2 and DP2 ZeRO-1, other
seeds): every tensor of the output is the fp32 mean of the two sources' tensors, bit for bit (the vocabulary
matrices: the tokenizer's rows; TP2 pads the 384-token vocabulary to 512 rows, DP2 keeps 384, and the output keeps
the first checkpoint's padding); `generate`, `export-hf` and `model.init_from` read the output unchanged. And the
one-line refusals: model shapes that differ, one checkpoint, a non-empty output."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "train"))
from train_common import launch, run_python, tiny_shards, train_args  # noqa: E402

from pretrain.checkpoint.reader import CheckpointReader  # noqa: E402
from pretrain.checkpoint.weights import ImportedWeights  # noqa: E402
from pretrain.cli import main as cli  # noqa: E402

pytestmark = pytest.mark.slow  # the module fixture trains two 2-rank runs


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[Path, Path, Path]:
    """(shards, a TP2 run, a DP2 ZeRO-1 run): 3 steps each, the same model shape, other seeds."""
    root = tmp_path_factory.mktemp("avg")
    shards = tiny_shards(root / "data") / "shards"
    made = []
    for name, layout in (("tp2", ["parallel.tp=2", "train.seed=1"]),
                         ("dp2", ["parallel.zero_stage=1", "train.seed=2"])):
        p = launch(2, train_args(shards, root / name, "train.max_steps=3", "optim.lr=0.01", *layout))
        assert p.returncode == 0, p.stderr[-3000:]
        made.append(root / name)
    return shards, made[0], made[1]


def test_average_is_the_exact_fp32_mean_and_reads_like_an_import(runs, tmp_path, capsys):
    shards, tp2, dp2 = runs
    out = tmp_path / "avg"
    assert cli(["average", "--checkpoints", str(tp2), str(dp2 / "step_3"), "--out", str(out)]) == 0
    assert f"-> {out}" in capsys.readouterr().out

    a, b, avg = CheckpointReader(tp2 / "step_3"), CheckpointReader(dp2 / "step_3"), ImportedWeights(out)
    vocab = avg.run.vocab_size  # the tokenizer's 384 tokens
    assert sorted(avg.names()) == sorted(a.names())
    for name in a.names():
        x, y, got = a.tensor(name), b.tensor(name), avg.tensor(name)
        assert got.dtype == torch.float32, name
        if x.shape != y.shape:  # a vocabulary matrix: 512 rows at tp 2, 384 at tp 1
            assert (x.shape[0], y.shape[0]) == (512, 384) and got.shape == x.shape, name
            assert torch.equal(got[:vocab], torch.stack([x[:vocab], y[:vocab]]).mean(0)), name
            assert torch.equal(got[vocab:], x[vocab:]), name  # the first checkpoint's padding
        else:
            assert torch.equal(got, torch.stack([x, y]).mean(0)), name
            assert not torch.equal(got, x), name  # other seeds: a real mean, not a copy
    meta = json.loads((out / "meta.json").read_text())
    assert meta["extra"]["averaged"] == [{"path": str((tp2 / "step_3").resolve()), "step": 3},
                                         {"path": str((dp2 / "step_3").resolve()), "step": 3}]

    capsys.readouterr()
    assert cli(["generate", "--checkpoint", str(out), "--prompt", "the model", "--max-new-tokens", "8",
                "--temperature", "0"]) == 0
    assert capsys.readouterr().out.startswith("the model")
    assert cli(["export-hf", "--checkpoint", str(out), "--out", str(tmp_path / "hf")]) == 0
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["vocab_size"] == 512
    p = run_python(train_args(shards, tmp_path / "from_avg", "train.max_steps=1", f"model.init_from={out}"))
    assert p.returncode == 0, p.stderr[-3000:]
    assert f"starting from {out} (weights only)" in p.stderr


def test_refusals_are_one_line(runs, tmp_path, capsys):
    from hf_oracle import make_hf_model

    shards, tp2, dp2 = runs
    other = tmp_path / "wide"  # another shape, imported from transformers: no training needed
    make_hf_model(tmp_path / "hf")
    assert cli(["import-hf", "--model", str(tmp_path / "hf"), "--out", str(other)]) == 0
    for args, expected in (([str(tp2), str(other)], "the model shapes differ (dim 32 vs 64"),
                           ([str(tp2)], "averaging needs at least 2 checkpoints, 1 given")):
        capsys.readouterr()
        assert cli(["average", "--checkpoints", *args, "--out", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err
        assert expected in err and len(err.strip().splitlines()) == 1, err
        assert not (tmp_path / "out").exists()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    assert cli(["average", "--checkpoints", str(tp2), str(dp2), "--out", str(tmp_path / "full")]) == 2
    assert "is not empty" in capsys.readouterr().err
