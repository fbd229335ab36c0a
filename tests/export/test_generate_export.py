"""`pretrain generate` and `pretrain export-hf` on a trained run: the shape training resolved (context longer than
the flavor's), the exported directory loads with AutoTokenizer/AutoModelForCausalLM at transformers' default dtype,
and transformers' greedy continuation (the README's recipe: eos before the prompt) equals `pretrain generate`'s."""
from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "train"))
from spawn import REPO, child_env  # noqa: E402
from train_common import tiny_shards, train_args  # noqa: E402

from pretrain.cli import main as cli  # noqa: E402

pytestmark = pytest.mark.slow  # the module fixture trains the model it generates from

SEQ = 640  # longer than the debug flavor's max_seq_len (512): training stretched the model's context


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("gen")
    shards = tiny_shards(root / "data") / "shards"
    run = root / "run"
    p = subprocess.run([sys.executable, *train_args(shards, run, "train.max_steps=4", f"train.seq_len={SEQ}",
                                                    "train.micro_batch_size=1", "train.grad_accum=1",
                                                    "optim.lr=0.01")],
                       cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    return run


def generate(*args: str) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert cli(["generate", *args]) == 0
    return out.getvalue().rstrip("\n")


def test_generate_and_export_use_the_trained_context_length(trained, tmp_path):
    text = generate("--checkpoint", str(trained), "--prompt", "the model", "--max-new-tokens", "600",
                    "--temperature", "0")  # prompt + 600 > the flavor's 512 positions
    assert text.startswith("the model")
    assert cli(["export-hf", "--checkpoint", str(trained), "--out", str(tmp_path / "hf")]) == 0
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["max_position_embeddings"] == SEQ
    assert json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())["model_max_length"] == SEQ


def test_transformers_greedy_equals_pretrain_generate(trained, tmp_path):
    prompt = "the model"
    ours = generate("--checkpoint", str(trained), "--prompt", prompt, "--max-new-tokens", "24", "--temperature", "0")
    assert cli(["export-hf", "--checkpoint", str(trained), "--out", str(tmp_path / "hf")]) == 0

    # The README's recipe, verbatim in spirit: default dtype, eos before the prompt, greedy.
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert model.dtype == torch.float32  # the training dtype of this run (fp32) is the default export dtype
    ids = [tok.eos_token_id] + tok(prompt, add_special_tokens=False).input_ids
    out = model.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False)[0, len(ids):].tolist()
    theirs = prompt + tok.decode([t for t in out if t != tok.eos_token_id])
    assert theirs == ours


def test_tokenizer_override_and_refusal(trained, tmp_path, capsys):
    from shared import without_tokenizer

    from pretrain import checkpoint

    step = Path(trained) / (Path(trained) / checkpoint.LATEST).read_text().strip()
    copied = without_tokenizer(Path(trained), tmp_path / "run")

    capsys.readouterr()
    code = cli(["export-hf", "--checkpoint", str(copied), "--out", str(tmp_path / "hf")])
    err = capsys.readouterr().err
    assert code == 2 and "holds no tokenizer" in err and "pass --tokenizer" in err, err
    assert not (tmp_path / "hf").exists()

    tok_dir = step / checkpoint.TOKENIZER_DIR
    assert cli(["export-hf", "--checkpoint", str(copied), "--out", str(tmp_path / "hf"),
                "--tokenizer", str(tok_dir)]) == 0
    assert transformers.AutoTokenizer.from_pretrained(tmp_path / "hf").eos_token_id is not None
    assert generate("--checkpoint", str(copied), "--prompt", "the", "--max-new-tokens", "4", "--temperature", "0",
                    "--tokenizer", str(tok_dir)).startswith("the")
