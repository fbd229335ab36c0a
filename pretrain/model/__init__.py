"""The LLaMA model: architecture (transformer.py), what it asks of a parallel build (layers.py), its one seeded
init (init.py), flavors (args.py), FLOPs per token (flops.py), KV-cache sampling (generate.py), packed-document
boundaries (documents.py), the output head's token chunks (loss_chunks.py) and what selective recompute saves
(recompute.py).

The names below load on first use (PEP 562): `pretrain.model.args` (flavors, shapes) is read by the config,
`pretrain plan` and `--dry-run`, which must not pay for importing torch."""
from __future__ import annotations

import importlib
from typing import Any

_HOME = {"FLAVORS": "args", "ModelArgs": "args", "init_model": "init", "LayerFactory": "layers",
         "REFERENCE": "layers", "Transformer": "transformer", "TransformerBlock": "transformer",
         "KVCache": "transformer"}
__all__ = list(_HOME)


def __getattr__(name: str) -> Any:
    if name not in _HOME:
        raise AttributeError(f"module 'pretrain.model' has no attribute {name!r}")
    return getattr(importlib.import_module(f"pretrain.model.{_HOME[name]}"), name)
