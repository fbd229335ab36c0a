"""The LLaMA model: architecture (transformer.py), what it asks of a parallel build (layers.py), its one seeded
init (init.py), flavors (args.py) and KV-cache sampling (generate.py)."""
from pretrain.model.args import FLAVORS, ModelArgs
from pretrain.model.init import init_model
from pretrain.model.layers import REFERENCE, LayerFactory
from pretrain.model.transformer import KVCache, Transformer, TransformerBlock

__all__ = ["FLAVORS", "ModelArgs", "LayerFactory", "REFERENCE", "Transformer", "TransformerBlock", "KVCache",
           "init_model"]
