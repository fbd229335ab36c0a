"""Export a trained model to Hugging Face's LlamaForCausalLM layout: config.json + safetensors (+ tokenizer).

Our parameter names are Meta's LLaMA names and our RoPE uses the rotate-half convention that transformers'
Llama implements, so export is a renaming of tensors: no query/key permutation as in Meta -> HF conversions.
The (padded) vocabulary is kept whole so exported logits equal ours exactly; the padding rows are never targets.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from pretrain.model.args import ModelArgs

_LAYER_MAP = {
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
_TOP_MAP = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
            "output.weight": "lm_head.weight"}
_LAYER_KEY = re.compile(r"^layers\.(\d+)\.(.+)$")
SHARD_BYTES = 5 * 2**30  # transformers' default max shard size


def hf_name(name: str) -> str:
    """Our parameter name -> transformers' LlamaForCausalLM name; KeyError for anything unknown."""
    if name in _TOP_MAP:
        return _TOP_MAP[name]
    match = _LAYER_KEY.match(name)
    if match is None or match.group(2) not in _LAYER_MAP:
        raise KeyError(f"parameter {name!r} has no Hugging Face Llama equivalent")
    return f"model.layers.{match.group(1)}.{_LAYER_MAP[match.group(2)]}"


def hf_config(args: ModelArgs, vocab_size: int, bos_token_id: int | None, eos_token_id: int | None,
              dtype: torch.dtype) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": args.dim,
        "intermediate_size": args.hidden_dim,
        "num_hidden_layers": args.n_layers,
        "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.kv_heads,
        "head_dim": args.head_dim,
        "vocab_size": vocab_size,
        "max_position_embeddings": args.max_seq_len,
        "rms_norm_eps": args.norm_eps,
        "rope_theta": args.rope_theta,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": args.tie_embeddings,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }


def _shards(tensors: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    return shards


def export_hf(state_dict: dict[str, torch.Tensor], args: ModelArgs, out_dir: str | Path, *,
              tokenizer_dir: str | Path | None = None, bos_token_id: int | None = None,
              eos_token_id: int | None = None, dtype: torch.dtype = torch.bfloat16,
              max_shard_bytes: int = SHARD_BYTES) -> Path:
    """Write `out_dir` (refusing a non-empty one) through a temp dir renamed at the end."""
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir} is not empty; choose a new directory")
    vocab_size = state_dict["tok_embeddings.weight"].shape[0]
    tensors = {}
    for name, t in state_dict.items():
        if args.tie_embeddings and name == "output.weight":
            continue  # transformers re-ties lm_head to embed_tokens
        tensors[hf_name(name)] = t.detach().to("cpu", dtype).contiguous()

    tmp = out_dir.with_name(f".tmp_{out_dir.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    shards = _shards(tensors, max_shard_bytes)
    if len(shards) == 1:
        save_file(shards[0], tmp / "model.safetensors", metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards, 1):
            fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, tmp / fname, metadata={"format": "pt"})
            weight_map.update({name: fname for name in shard})
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        (tmp / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    config = hf_config(args, vocab_size, bos_token_id, eos_token_id, dtype)
    (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    if tokenizer_dir is not None and (Path(tokenizer_dir) / "tokenizer.json").is_file():
        shutil.copy(Path(tokenizer_dir) / "tokenizer.json", tmp / "tokenizer.json")
        tok_cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": args.max_seq_len}
        (tmp / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2) + "\n")
    if out_dir.exists():
        out_dir.rmdir()
    os.replace(tmp, out_dir)
    return out_dir
