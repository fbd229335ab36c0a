"""Export and generate from any committed step (not only the final one) straight from DeepSpeed's files, with
fp32 master weights; and `pretrain train` started from an imported Hugging Face model on a pipeline layout (and an
imported Qwen3, a QK-norm model, on a tensor-parallel one)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "train"))
from hf_oracle import VOCAB, make_hf_model, oracle_shards, saved_tensors  # noqa: E402
from spawn import REPO, child_env, torchrun  # noqa: E402
from train_common import tiny_shards, train_args  # noqa: E402

from pretrain.cli import main as cli  # noqa: E402

pytestmark = pytest.mark.slow  # each test trains the checkpoints it exports


def test_any_step_exports_fp32_master_weights_and_bf16_by_default(tmp_path):
    """A bf16 ZeRO-1 run checkpointed every step: step_2 (not the last) exports without the training world; the
    default dtype is the training dtype (bf16), and --dtype fp32 gives the optimizer's fp32 master weights, which
    the bf16 module copy cannot hold. step_1 generates; step_2 starts another bf16 run (model.init_from) from
    its exact fp32 masters."""
    from pretrain.checkpoint.reader import CheckpointReader

    shards = tiny_shards(tmp_path / "data") / "shards"
    run = tmp_path / "run"
    p = subprocess.run([sys.executable, *train_args(shards, run, "train.max_steps=3", "checkpoint.every=1",
                                                    "checkpoint.keep=5", "train.dtype=bf16",
                                                    "parallel.zero_stage=1", "optim.lr=0.01")],
                       cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    step = run / "step_2"
    assert not (step / "consolidated.pt").exists()

    assert cli(["export-hf", "--checkpoint", str(step), "--out", str(tmp_path / "bf16")]) == 0
    config = json.loads((tmp_path / "bf16" / "config.json").read_text())
    assert config["dtype"] == "bfloat16"
    assert {t.dtype for t in saved_tensors(tmp_path / "bf16").values()} == {torch.bfloat16}
    assert transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "bf16").dtype == torch.bfloat16

    assert cli(["export-hf", "--checkpoint", str(step), "--out", str(tmp_path / "fp32"), "--dtype", "fp32",
                "--max-shard-size", "20KB"]) == 0
    exported = saved_tensors(tmp_path / "fp32")
    assert (tmp_path / "fp32" / "model.safetensors.index.json").is_file()
    reader = CheckpointReader(step)
    from pretrain.hf.format import hf_name

    not_bf16 = 0
    for name in reader.names():
        master = reader.tensor(name)
        assert torch.equal(exported[hf_name(name)], master), name
        not_bf16 += int(not torch.equal(master, master.bfloat16().float()))
    assert not_bf16 > 0, "every exported weight is bf16-representable: exported the bf16 copy, not the master"

    # A fresh process on purpose: its stdout must start with the text, no library start-up notice before it.
    out = subprocess.run([sys.executable, "-m", "pretrain", "generate", "--checkpoint", str(run / "step_1"),
                          "--prompt", "the model", "--max-new-tokens", "8", "--temperature", "0"],
                         cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.startswith("the model"), out.stderr[-2000:]

    # model.init_from takes a training step too: a new bf16 run starts from step_2's fp32 master weights, exactly
    # (not rounded through the bf16 module copy DeepSpeed builds its masters from); one step at lr 1e-30 cannot
    # move an fp32 weight, so what it exports is exactly step_2's masters.
    p = subprocess.run([sys.executable, *train_args(shards, tmp_path / "again", "train.max_steps=1",
                                                    f"model.init_from={step}", "optim.lr=1e-30",
                                                    "train.dtype=bf16", "parallel.zero_stage=1")],
                       cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert f"starting from {step} (weights only) at step 0" in p.stderr
    assert cli(["export-hf", "--checkpoint", str(tmp_path / "again"), "--out", str(tmp_path / "again_hf"),
                "--dtype", "fp32"]) == 0
    again = saved_tensors(tmp_path / "again_hf")
    for name in reader.names():
        assert torch.equal(again[hf_name(name)], reader.tensor(name)), name


@pytest.mark.parametrize("kind", ["llama_pp2", "qwen3_tp2"])
def test_train_from_imported_model_on_a_pipeline_or_tensor_parallel_layout(tmp_path, kind):
    """import-hf -> `pretrain train` with model.init_from on PP=2 x ZeRO-1 (2 ranks), one step at lr 1e-30 (the
    weights cannot move in fp32) -> export-hf of that step: transformers' original tensors come back exactly,
    inside a vocabulary padded from 300 to 384 rows. A Qwen3 (model.qk_norm) the same way on TP=2 x ZeRO-1: its
    q_norm / k_norm weights are whole on both TP ranks, read back from the TP-sharded checkpoint as they are."""
    qwen3 = kind == "qwen3_tp2"
    make_hf_model(tmp_path / "hf", qwen3=qwen3)
    assert cli(["import-hf", "--model", str(tmp_path / "hf"), "--out", str(tmp_path / "ckpt")]) == 0
    shards = oracle_shards(tmp_path / "data", tmp_path / "ckpt" / "tokenizer")
    sets = ["model.dim=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2", "model.ffn_hidden_dim=96",
            "model.norm_eps=1e-6", "model.rope_theta=50000.0", "model.vocab_size=300",
            f"model.init_from={tmp_path / 'ckpt'}", f"data.path={shards}", "data.val_path=null",
            "train.eval_every=0", "train.seq_len=16", "train.micro_batch_size=1", "train.grad_accum=2",
            "train.max_steps=1", "optim.lr=1e-30", "parallel.zero_stage=1",
            "tracking.enabled=false", f"checkpoint.dir={tmp_path / 'run'}", "train.device=cpu"]
    sets += ["model.qk_norm=true", "parallel.tp=2"] if qwen3 else ["parallel.pp=2"]
    padded = 512 if qwen3 else 384  # 128 x tp
    proc = torchrun(2, ["-m", "pretrain", "train", "--config", str(REPO / "configs" / "debug.yaml"),
                        *[x for kv in sets for x in ("--set", kv)]], timeout=600)
    assert f"starting from {tmp_path / 'ckpt'} (weights only) at step 0" in proc.stderr
    assert cli(["export-hf", "--checkpoint", str(tmp_path / "run"), "--out", str(tmp_path / "out"),
                "--dtype", "fp32"]) == 0
    before, after = saved_tensors(tmp_path / "hf"), saved_tensors(tmp_path / "out")
    assert sorted(before) == sorted(after)
    assert ("model.layers.1.self_attn.q_norm.weight" in after) == qwen3
    for name, t in before.items():
        got = after[name]
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            assert got.shape[0] == padded  # the layout's padded vocabulary
            got = got[:VOCAB]
        assert torch.equal(got, t), name
    gen = json.loads((tmp_path / "out" / "generation_config.json").read_text())
    assert gen["suppress_tokens"] == list(range(280, padded))  # the tokenizer's 280 ids are the only ones sampled
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["model_type"] == ("qwen3" if qwen3 else "llama")
