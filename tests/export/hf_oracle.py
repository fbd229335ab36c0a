"""The test oracle for Hugging Face import/export: transformers' own LlamaForCausalLM (or Qwen3ForCausalLM), built
from a config here and saved by transformers itself (never a hub download), with a small BPE tokenizer saved the
transformers way."""
from __future__ import annotations

import json
from pathlib import Path

import torch

VOCAB = 300  # not a multiple of 128: every layout pads it (384 for tp=1, 512 for tp=2)
WORDS = ("the a model data token train loss step rank shard layer head query key value norm gradient batch "
         "sequence learning rate warm cosine decay checkpoint resume signal metric run tensor pipeline").split()


def hf_config(*, gqa: bool = True, tied: bool = False, qwen3: bool = False):
    """A LlamaConfig, or with `qwen3` the same shape as a Qwen3Config (QK-norm; head_dim written out)."""
    import transformers

    shape = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2 if gqa else 4, max_position_embeddings=96, rope_theta=50000.0,
                 rms_norm_eps=1e-6, tie_word_embeddings=tied, bos_token_id=0, eos_token_id=1, pad_token_id=2)
    if qwen3:
        return transformers.Qwen3Config(**shape, head_dim=16)
    return transformers.LlamaConfig(**shape)


def save_tokenizer(out: Path) -> None:
    """A byte-level BPE (specials <s> </s> <pad> = ids 0 1 2), saved by transformers' PreTrainedTokenizerFast."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB - 20, special_tokens=["<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([" ".join(WORDS[i:] + WORDS[:i]) for i in range(len(WORDS))], trainer=trainer)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                                pad_token="<pad>")
    fast.save_pretrained(out)


def make_hf_model(out: Path, *, gqa: bool = True, tied: bool = False, shard_size: str | None = None,
                  seed: int = 0, tokenizer: bool = True, qwen3: bool = False):
    """A random LlamaForCausalLM (Qwen3ForCausalLM with `qwen3`) saved to `out` (sharded when `shard_size` is
    given). RMSNorm weights are made random too (transformers starts them at one), so a norm mapped to the wrong
    place cannot go unnoticed."""
    import transformers

    torch.manual_seed(seed)
    cls = transformers.Qwen3ForCausalLM if qwen3 else transformers.LlamaForCausalLM
    model = cls(hf_config(gqa=gqa, tied=tied, qwen3=qwen3)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
    kwargs = {"max_shard_size": shard_size} if shard_size else {}
    model.save_pretrained(out, **kwargs)
    if tokenizer:
        save_tokenizer(out)
    return model


def saved_tensors(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a transformers-style safetensors directory (single file or index + shards)."""
    from safetensors.torch import load_file

    index = directory / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else \
        ["model.safetensors"]
    out: dict[str, torch.Tensor] = {}
    for f in files:
        out.update(load_file(directory / f))
    return out


def oracle_shards(root: Path, tokenizer: Path) -> Path:
    """root/shards: 200 short documents of the oracle's words tokenized with `tokenizer`, through `pretrain-data
    prepare` called in this process (the data CLI is not what these tests check; a process would only add its
    start-up)."""
    from data_pipeline.cli import main as data_cli

    root.mkdir(parents=True, exist_ok=True)
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"the model {i} learns a token rate warm step"}) + "\n"
                              for i in range(200)))
    assert data_cli(["prepare", "--input", str(corpus), "--tokenizer", str(tokenizer), "--out", str(root / "shards"),
                     "--workers", "0", "--no-progress"]) == 0
    return root / "shards"


def tokens(batch: int = 2, length: int = 40, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))
