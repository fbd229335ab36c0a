"""FP8 training of the blocks' projections with torchao's float8 linear layers (`train.fp8`).

`tensorwise` scales each tensor by one factor (fastest; torchtitan's default), `rowwise` per row (more accurate,
a little slower). Only the transformer blocks' seven projections (wq wk wv wo, w1 w2 w3) switch to FP8 matmuls:
the embedding is a lookup, and the output head feeds the loss at full precision (its chunked loss reads the weight
directly). Needs a GPU with FP8 tensor cores (compute capability >= 8.9: H100, H200, L40S, B200), tp = 1
(torchao replaces nn.Linear; megatron-core's tensor-parallel linears are not converted), and torchao
(`pip install 'pretrain[fp8]'`). Best with `model.compile: true`, where torch.compile fuses the casts.
"""
from __future__ import annotations

import re

from torch import nn

from pretrain.config import ConfigError

BLOCK_PROJECTION = re.compile(r"(^|\.)(attention\.(wq|wk|wv|wo)|feed_forward\.(w1|w2|w3))$")
MIN_CAPABILITY = (8, 9)


def check_fp8(recipe: str, device) -> None:
    """Refuse, in one line naming the setting, a machine that cannot run FP8 (tp is the config's rule)."""
    import torch

    if recipe == "none":
        return
    if device.type != "cuda":
        raise ConfigError(f"train.fp8={recipe} needs a CUDA GPU with FP8 tensor cores (compute capability >= 8.9: "
                          f"H100, H200, L40S, B200); this run is on {device.type}: set train.fp8=none")
    capability = torch.cuda.get_device_capability(device)
    if capability < MIN_CAPABILITY:
        raise ConfigError(f"train.fp8={recipe} needs compute capability >= 8.9 (FP8 tensor cores); "
                          f"{torch.cuda.get_device_name(device)} has {capability[0]}.{capability[1]}")
    try:
        import torchao.float8  # noqa: F401
    except ImportError:
        raise ConfigError(f"train.fp8={recipe} needs torchao: pip install 'pretrain[fp8]'") from None


def fp8_module_names(model: nn.Module) -> list[str]:
    """The linears FP8 converts: every block projection whose dims torchao's FP8 matmuls take (multiples of 16)."""
    return [name for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and BLOCK_PROJECTION.search(name)
            and m.in_features % 16 == 0 and m.out_features % 16 == 0]


def convert_to_fp8(model: nn.Module, recipe: str, emulate: bool = False) -> list[str]:
    """Swap the block projections for torchao's Float8Linear (weights kept, same parameter names); returns the
    names converted. `emulate`: torchao's CPU emulation of the FP8 matmuls, for tests only."""
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    names = set(fp8_module_names(model))
    config = Float8LinearConfig.from_recipe_name(recipe)
    if emulate:
        config = Float8LinearConfig(**{**config.__dict__, "emulate": True})
    convert_to_float8_training(model, config=config, module_filter_fn=lambda m, fqn: fqn in names)
    return sorted(names)
