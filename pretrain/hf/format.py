"""The Hugging Face LlamaForCausalLM format, both ways: parameter names and config.json <-> ModelArgs; with
`qk_norm`, Qwen3ForCausalLM's.

Our parameter names are Meta's LLaMA names and our RoPE uses the rotate-half convention that transformers'
Llama implements, so both directions are a renaming of tensors: no query/key permutation as in Meta <-> HF
conversions. Qwen3 is Llama's network plus an RMSNorm of each head's queries and keys before RoPE (`q_norm`,
`k_norm`, eps rms_norm_eps, weights shared by the heads): exactly our `qk_norm`, so a QK-norm model is exported as
one (model_type qwen3, no attention bias, head_dim written out, no sliding window) and a Qwen3 directory imports.
What our model cannot express (biases, other activations, RoPE scaling, a head_dim that is not dim / n_heads,
Qwen3's sliding-window layers) is refused on import by name, never silently dropped.
"""
from __future__ import annotations

import re
from typing import Any

import torch

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
    "attention.q_norm.weight": "self_attn.q_norm.weight",  # qk_norm: Qwen3's names
    "attention.k_norm.weight": "self_attn.k_norm.weight",
}
_TOP_MAP = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
            "output.weight": "lm_head.weight"}
_LAYER_KEY = re.compile(r"^layers\.(\d+)\.(.+)$")
_HF_LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_LAYER_BACK = {v: k for k, v in _LAYER_MAP.items()}
_TOP_BACK = {v: k for k, v in _TOP_MAP.items()}


class HFFormatError(ValueError):
    """A Hugging Face directory our model cannot represent (one line naming the file and key)."""


# model_type -> the transformers class it loads as; a QK-norm model is a Qwen3, any other a Llama.
ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM"}


def model_type(args: ModelArgs) -> str:
    return "qwen3" if args.qk_norm else "llama"


def architecture(args: ModelArgs) -> str:
    """The transformers class an export of `args` loads as."""
    return ARCHITECTURES[model_type(args)]


def hf_name(name: str) -> str:
    """Our parameter name -> transformers' LlamaForCausalLM / Qwen3ForCausalLM name (the same names, Qwen3's
    q_norm / k_norm besides); KeyError for anything unknown."""
    if name in _TOP_MAP:
        return _TOP_MAP[name]
    match = _LAYER_KEY.match(name)
    if match is None or match.group(2) not in _LAYER_MAP:
        raise KeyError(f"parameter {name!r} has no Hugging Face Llama equivalent")
    return f"model.layers.{match.group(1)}.{_LAYER_MAP[match.group(2)]}"


def reference_name(hf: str) -> str | None:
    """transformers' name -> ours; None for a tensor that is not a parameter of ours (e.g. rotary inv_freq)."""
    if hf in _TOP_BACK:
        return _TOP_BACK[hf]
    match = _HF_LAYER_KEY.match(hf)
    if match is None or match.group(2) not in _LAYER_BACK:
        return None
    return f"layers.{match.group(1)}.{_LAYER_BACK[match.group(2)]}"


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def hf_config(args: ModelArgs, *, bos_token_id: int | None, eos_token_id: int | None, dtype: torch.dtype,
              pad_token_id: int | None = None) -> dict[str, Any]:
    """config.json of a LlamaForCausalLM (a Qwen3ForCausalLM with `qk_norm`) with our shape. Both spellings of
    RoPE's base are written: transformers 5 reads `rope_parameters`, older releases `rope_theta`."""
    config = {
        "architectures": [architecture(args)],
        "model_type": model_type(args),
        "hidden_size": args.dim,
        "intermediate_size": args.hidden_dim,
        "num_hidden_layers": args.n_layers,
        "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.kv_heads,
        "head_dim": args.head_dim,
        "vocab_size": args.vocab_size,
        "max_position_embeddings": args.max_seq_len,
        "rms_norm_eps": args.norm_eps,
        "rope_theta": args.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": args.rope_theta},
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": args.tie_embeddings,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "pad_token_id": pad_token_id,
        "dtype": dtype_name(dtype),
        "torch_dtype": dtype_name(dtype),
    }
    if args.qk_norm:  # Qwen3: every layer full attention (its sliding window is off by default; said so here)
        del config["mlp_bias"]  # not a Qwen3 option: its MLP never has biases
        config.update(use_sliding_window=False, sliding_window=None, max_window_layers=args.n_layers,
                      attention_dropout=0.0)
    return config


def model_args(config: dict[str, Any], where: str) -> ModelArgs:
    """config.json of a LlamaForCausalLM or Qwen3ForCausalLM -> our ModelArgs (vocab unpadded, as the checkpoint
    has it; qk_norm for Qwen3)."""
    def need(key: str) -> Any:
        if key not in config:
            raise HFFormatError(f"{where}: no {key!r}")
        return config[key]

    kind = config.get("model_type")
    if kind not in ARCHITECTURES:
        raise HFFormatError(f"{where}: model_type is {kind!r}; only 'llama' (LlamaForCausalLM) and 'qwen3' "
                            "(Qwen3ForCausalLM) can be imported")
    if kind == "qwen3" and config.get("use_sliding_window"):
        raise HFFormatError(f"{where}: use_sliding_window=true; our attention is full causal attention in every "
                            "layer")
    if config.get("hidden_act", "silu") != "silu":
        raise HFFormatError(f"{where}: hidden_act={config['hidden_act']!r}; our SwiGLU uses silu")
    for key in ("attention_bias", "mlp_bias"):
        if config.get(key):
            raise HFFormatError(f"{where}: {key}=true; our model has no biases")
    rope = config.get("rope_parameters") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    scaling = config.get("rope_scaling")
    if rope_type != "default" or (scaling and scaling.get("rope_type", scaling.get("type")) != "default"):
        raise HFFormatError(f"{where}: RoPE scaling ({scaling or rope}) is not implemented by our model")
    dim, heads = int(need("hidden_size")), int(need("num_attention_heads"))
    head_dim = config.get("head_dim")
    if head_dim is not None and int(head_dim) * heads != dim:
        raise HFFormatError(f"{where}: head_dim={head_dim} is not hidden_size / num_attention_heads = "
                            f"{dim // heads}; our attention derives head_dim from them")
    theta = rope.get("rope_theta", config.get("rope_theta", 10000.0))
    return ModelArgs(dim=dim, n_layers=int(need("num_hidden_layers")), n_heads=heads,
                     n_kv_heads=int(config.get("num_key_value_heads") or heads),
                     vocab_size=int(need("vocab_size")), ffn_hidden_dim=int(need("intermediate_size")),
                     norm_eps=float(config.get("rms_norm_eps", 1e-6)), rope_theta=float(theta),
                     max_seq_len=int(config.get("max_position_embeddings", 2048)),
                     tie_embeddings=bool(config.get("tie_word_embeddings", False)), qk_norm=kind == "qwen3")
