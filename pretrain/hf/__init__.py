"""Hugging Face LlamaForCausalLM checkpoints: the name and config mapping (format.py), export of any step
(export.py), import into a checkpoint `model.init_from` takes (importer.py), streamed safetensors shards
(safetensors_dir.py)."""
