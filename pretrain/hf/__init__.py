"""Hugging Face LlamaForCausalLM checkpoints (Qwen3ForCausalLM for a `model.qk_norm` model): the name and config
mapping (format.py), export of any step (export.py), import into a checkpoint `model.init_from` takes
(importer.py). The streamed safetensors shards both use are pretrain/checkpoint/safetensors_dir.py (an imported
checkpoint holds them too)."""
