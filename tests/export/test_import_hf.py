"""`pretrain import-hf` and `model.init_from`: transformers' own LlamaForCausalLM (built from a config in the test,
saved by transformers) is the oracle for what the imported weights compute, under TP=1 and TP=2 layouts."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hf_oracle import VOCAB, make_hf_model, oracle_shards, saved_tensors, tokens  # noqa: E402
from spawn import REPO, child_env, torchrun  # noqa: E402

from pretrain.cli import main as cli  # noqa: E402
from pretrain.checkpoint.weights import ImportedWeights  # noqa: E402


def pretrain(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pretrain", *args], cwd=REPO, env=child_env(),
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_imported_weights_compute_transformers_logits_on_tp1_and_tp2(tmp_path):
    """The training engine started from an imported checkpoint (model.init_from) under TP=1 x DP=2 ZeRO-3 and
    TP=2 ZeRO-1 computes transformers' logits for the real vocabulary (fp32, max abs diff <= 1e-4); a GQA model
    with its own head and a tied-embedding one, both read from sharded safetensors."""
    models, args = {}, []
    for tied in ("untied", "tied"):
        models[tied] = make_hf_model(tmp_path / f"hf_{tied}", tied=tied == "tied", shard_size="100KB")
        assert (tmp_path / f"hf_{tied}" / "model.safetensors.index.json").is_file()  # the sharded input path
        assert cli(["import-hf", "--model", str(tmp_path / f"hf_{tied}"), "--out", str(tmp_path / tied)]) == 0
        args.append(f"{tmp_path / tied}:{tied}")
    x = tokens()
    torch.save(x, tmp_path / "tokens.pt")
    torchrun(2, [str(REPO / "tests" / "export" / "init_from_worker.py"), str(tmp_path / "tokens.pt"),
                 str(tmp_path), *args], timeout=600)
    for tied, hf in models.items():
        with torch.no_grad():
            theirs = hf(x).logits
        for layout, padded in (("tp1_dp2_zero3", 384), ("tp2_zero1", 512)):
            ours = torch.load(tmp_path / f"{tied}_{layout}.pt")
            assert ours.shape[-1] == padded  # the vocabulary padded to 128 x tp for this layout
            diff = (ours[..., :VOCAB] - theirs).abs().max().item()
            assert diff <= 1e-4, f"{tied} {layout}: max abs logit difference {diff}"


@pytest.mark.parametrize("gqa,tied", [(True, False), (False, True)], ids=["gqa", "tied"])
def test_export_of_import_reproduces_the_tensors_bit_for_bit(tmp_path, gqa, tied):
    make_hf_model(tmp_path / "hf", gqa=gqa, tied=tied, shard_size="60KB")
    assert cli(["import-hf", "--model", str(tmp_path / "hf"), "--out", str(tmp_path / "ckpt"),
                "--max-shard-size", "50KB"]) == 0
    imported = ImportedWeights(tmp_path / "ckpt")
    assert imported.run.model.kv_heads == (2 if gqa else 4) and imported.run.model.tie_embeddings == tied
    assert cli(["export-hf", "--checkpoint", str(tmp_path / "ckpt"), "--out", str(tmp_path / "again")]) == 0
    before, after = saved_tensors(tmp_path / "hf"), saved_tensors(tmp_path / "again")
    assert sorted(after) == sorted(before)
    for name, t in before.items():
        assert after[name].dtype == t.dtype and torch.equal(after[name], t), name
    config = json.loads((tmp_path / "again" / "config.json").read_text())
    assert config["num_key_value_heads"] == (2 if gqa else 4) and config["tie_word_embeddings"] == tied
    assert config["max_position_embeddings"] == 96 and config["rope_theta"] == 50000.0
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "again")
    assert tok.eos_token == "</s>"


def test_qwen3_imports_as_a_qk_norm_model_with_transformers_logits(tmp_path):
    """A Qwen3ForCausalLM directory imports as model.qk_norm (q_norm / k_norm by their Qwen3 names): our model built
    from the imported weights computes transformers' logits (fp32), and exporting it again gives back a Qwen3
    with the very same tensors."""
    from pretrain.model import Transformer, init_model

    hf = make_hf_model(tmp_path / "hf", qwen3=True, shard_size="60KB")
    assert cli(["import-hf", "--model", str(tmp_path / "hf"), "--out", str(tmp_path / "ckpt")]) == 0
    imported = ImportedWeights(tmp_path / "ckpt")
    args = imported.run.model
    assert args.qk_norm and args.head_dim == 16 and "layers.1.attention.q_norm.weight" in imported.names()
    model = Transformer(args)
    init_model(model, args, seed=0, weights=imported.tensor)
    x = tokens()
    with torch.no_grad():
        torch.testing.assert_close(model(x), hf(x).logits, rtol=1e-5, atol=1e-5)

    assert cli(["export-hf", "--checkpoint", str(tmp_path / "ckpt"), "--out", str(tmp_path / "again")]) == 0
    config = json.loads((tmp_path / "again" / "config.json").read_text())
    assert config["architectures"] == ["Qwen3ForCausalLM"]
    before, after = saved_tensors(tmp_path / "hf"), saved_tensors(tmp_path / "again")
    assert sorted(after) == sorted(before) and "model.layers.0.self_attn.k_norm.weight" in after
    for name, t in before.items():
        assert torch.equal(after[name], t), name

    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**config, "use_sliding_window": True}))
    p = pretrain("import-hf", "--model", str(tmp_path / "hf"), "--out", str(tmp_path / "ckpt2"))
    assert p.returncode == 2 and "use_sliding_window=true" in p.stderr and len(p.stderr.strip().splitlines()) == 1


def test_imported_checkpoint_records_the_resolved_shape_and_tokenizer(tmp_path):
    make_hf_model(tmp_path / "hf")
    assert cli(["import-hf", "--model", str(tmp_path / "hf"), "--out", str(tmp_path / "ckpt")]) == 0
    run = ImportedWeights(tmp_path / "ckpt").run
    m = run.model
    assert (m.dim, m.n_layers, m.n_heads, m.kv_heads, m.hidden_dim, m.vocab_size, m.max_seq_len, m.rope_theta,
            m.norm_eps, m.tie_embeddings) == (64, 2, 4, 2, 96, VOCAB, 96, 50000.0, 1e-6, False)
    from data_pipeline.tokenizer import load_tokenizer

    tok = load_tokenizer(str(tmp_path / "hf"))
    assert run.tokenizer.identity == tok.identity and run.tokenizer.eos_id == 1
    assert (tmp_path / "ckpt" / "tokenizer" / "tokenizer.json").is_file()


def test_import_refuses_what_our_model_cannot_express(tmp_path):
    make_hf_model(tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**config, "mlp_bias": True}))
    p = pretrain("import-hf", "--model", str(tmp_path / "hf"), "--out", str(tmp_path / "ckpt"))
    assert p.returncode == 2 and "mlp_bias=true; our model has no biases" in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert not (tmp_path / "ckpt").exists()


@pytest.mark.slow
def test_train_init_from_checks_shape_and_tokenizer(tmp_path):
    """`pretrain train` with model.init_from: a config whose shape differs, or shards made with another tokenizer,
    is one line and exit 2 before the model is built."""
    make_hf_model(tmp_path / "hf")
    assert cli(["import-hf", "--model", str(tmp_path / "hf"), "--out", str(tmp_path / "ckpt")]) == 0
    from data_pipeline.tokenizer import train_bpe

    train_bpe(["the model learns a token"] * 50, 300, str(tmp_path / "other_tok"), show_progress=False)
    same = oracle_shards(tmp_path / "a", tmp_path / "hf")
    other = oracle_shards(tmp_path / "b", tmp_path / "other_tok")
    base = ["train", "--config", "configs/debug.yaml"] + [
        x for kv in ["model.dim=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2",
                     "model.ffn_hidden_dim=96", "model.norm_eps=1e-6", "model.rope_theta=50000.0",
                     "model.vocab_size=300", f"model.init_from={tmp_path / 'ckpt'}", "train.seq_len=16",
                     "train.micro_batch_size=1", "train.max_steps=1", "parallel.zero_stage=0",
                     "tracking.enabled=false", "data.val_path=null", "train.eval_every=0", "train.device=cpu"]
        for x in ("--set", kv)]

    p = pretrain(*base, "--set", f"data.path={same}", "--set", "model.rope_theta=10000.0",
                 "--set", f"checkpoint.dir={tmp_path / 'r1'}")
    assert p.returncode == 2, p.stderr[-3000:]
    assert "model shape differs: rope_theta 10000.0 (config) vs 50000.0 (checkpoint)" in p.stderr
    assert "--set model.rope_theta=50000.0" in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr

    p = pretrain(*base, "--set", f"data.path={other}", "--set", f"checkpoint.dir={tmp_path / 'r2'}")
    assert p.returncode == 2 and "made with another tokenizer" in p.stderr, p.stderr[-3000:]
    assert len(p.stderr.strip().splitlines()) == 1, p.stderr


def test_import_names_a_missing_tokenizer_in_one_line(tmp_path, capsys):
    """--tokenizer pointing nowhere is bad input: exit 2 with one line naming the path (was a FileNotFoundError
    traceback from listing a directory that is not there), and no output directory."""
    make_hf_model(tmp_path / "hf")
    missing = tmp_path / "no_such_tokenizer"
    capsys.readouterr()  # transformers' save progress bar
    code = cli(["import-hf", "--model", str(tmp_path / "hf"), "--out", str(tmp_path / "ckpt"),
                "--tokenizer", str(missing)])
    err = capsys.readouterr().err
    assert code == 2 and str(missing) in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "ckpt").exists()


def test_import_names_a_bad_max_shard_size(tmp_path, capsys):
    """A --max-shard-size that is not a size: one line naming the flag (as export-hf says it), exit 2."""
    code = cli(["import-hf", "--model", str(tmp_path / "hf"), "--out", str(tmp_path / "ckpt"),
                "--max-shard-size", "5XB"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "--max-shard-size: size '5XB'" in err, err
