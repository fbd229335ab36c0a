"""Hugging Face export: transformers' own LlamaForCausalLM (Qwen3ForCausalLM for a QK-norm model), loaded from our
directory, computes our logits."""
from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from pretrain.hf.export import export_hf  # noqa: E402
from pretrain.hf.format import hf_name  # noqa: E402
from pretrain.model import FLAVORS, Transformer, init_model  # noqa: E402
from pretrain.model.generate import Sampling, generate  # noqa: E402


@pytest.mark.parametrize("tied,shard_bytes", [(False, 5 * 2**30), (True, 5 * 2**30), (False, 200_000)],
                         ids=["untied", "tied", "sharded"])
def test_transformers_reproduces_our_logits(tmp_path, tied, shard_bytes):
    args = FLAVORS["debug"].replace(vocab_size=256, tie_embeddings=tied)
    model = Transformer(args)
    init_model(model, args, seed=3)
    out = export_hf(model.state_dict(), args, tmp_path / "hf", tokenizer=None, dtype=torch.float32,
                    max_shard_bytes=shard_bytes,
                    bos_token_id=1, eos_token_id=2)
    if shard_bytes < 2**20:
        index = json.loads((out / "model.safetensors.index.json").read_text())
        assert len(set(index["weight_map"].values())) > 1

    hf = transformers.LlamaForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    tokens = torch.randint(0, 256, (2, 33), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model(tokens)
        theirs = hf(tokens).logits
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)


def test_qk_norm_model_is_a_qwen3_for_transformers_logits_and_cached_greedy(tmp_path):
    """model.qk_norm exports as Qwen3ForCausalLM (its q_norm / k_norm before RoPE are our QK-norm): transformers'
    logits equal ours in fp32, and its KV-cache greedy decoding continues a prompt as `generate` does. Norm weights
    are made random (init starts them at one), so a norm mapped to the wrong place cannot go unnoticed."""
    args = FLAVORS["debug"].replace(vocab_size=256, qk_norm=True)
    model = Transformer(args)
    init_model(model, args, seed=3)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
    out = export_hf(model.state_dict(), args, tmp_path / "hf", tokenizer=None, dtype=torch.float32,
                    bos_token_id=1, eos_token_id=2)
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["Qwen3ForCausalLM"] and config["model_type"] == "qwen3"
    assert config["head_dim"] == args.head_dim and config["attention_bias"] is False
    assert not config["use_sliding_window"]

    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(hf).__name__ == "Qwen3ForCausalLM"
    assert torch.equal(hf.model.layers[1].self_attn.k_norm.weight, model.layers["1"].attention.k_norm.weight)
    tokens = torch.randint(0, 256, (2, 33), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model(tokens)
        theirs = hf(tokens).logits
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)

    prompt = [3, 17, 42, 5]
    mine = generate(model, prompt, 16, Sampling(temperature=0.0), eos_id=2)
    hf_out = hf.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False)[0, len(prompt):].tolist()
    assert hf_out == mine and len(mine) > 1


def test_refuses_non_empty_dir_and_unknown_names(tmp_path):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "x").write_text("keep me")
    args = FLAVORS["debug"].replace(vocab_size=256)
    with pytest.raises(FileExistsError, match="not empty"):
        export_hf(Transformer(args).state_dict(), args, tmp_path / "hf", tokenizer=None)
    assert (tmp_path / "hf" / "x").read_text() == "keep me"
    with pytest.raises(KeyError, match="layers.0.attention.bias"):
        hf_name("layers.0.attention.bias")


def test_sentencepiece_tokenizer_exports_for_autotokenizer(tmp_path):
    """A sentencepiece .model travels as tokenizer.model; transformers' tokenizer gives our ids and our eos."""
    import random

    import sentencepiece as spm

    from data_pipeline.tokenizer import load_tokenizer

    words = "the a model data token train loss step rank shard layer head query key value norm".split()
    rng = random.Random(0)
    (tmp_path / "t.txt").write_text("\n".join(" ".join(rng.choice(words) for _ in range(30)) for _ in range(300)))
    spm.SentencePieceTrainer.train(input=str(tmp_path / "t.txt"), model_prefix=str(tmp_path / "sp"), vocab_size=120,
                                   model_type="bpe", bos_id=1, eos_id=2, pad_id=3, unk_id=0, minloglevel=2)
    args = FLAVORS["debug"].replace(vocab_size=128)
    export_hf(Transformer(args).state_dict(), args, tmp_path / "hf", tokenizer=tmp_path / "sp.model",
              vocab_size=120, bos_token_id=1, eos_token_id=2)
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    ours = load_tokenizer(str(tmp_path / "sp.model"))
    text = "the model data token"
    assert theirs(text, add_special_tokens=False).input_ids == ours.encode_batch([text])[0]
    assert theirs.eos_token_id == ours.eos_id == 2
