"""Parallelism for the LLaMA model: the one place that decides how the model is split.

- tensor.py: megatron-core Column/Row/VocabParallel layers + the vocab-parallel chunked loss as a `LayerFactory`
  (the model asks, this answers); sequence-parallel adaptation and its norm-gradient hook (CUDA).
- pipeline.py: the model as a DeepSpeed `PipelineModule` (embedding, blocks, norm + head, loss), name mapping back
  to the reference model, and a check that DeepSpeed's topology and megatron-core agree on every rank's groups.
- mpu.py: DeepSpeed's six "model parallel unit" questions answered from megatron-core's `parallel_state`.
- optimizer.py: AdamW param groups (no decay on vectors) and the ZeRO-0/fp32 norm/clip/skip guard.
- consolidate.py: TP shards + PP stages + ZeRO-3 partitions -> one reference-named state dict on rank 0 (the
  tests' live-engine oracle; saved steps are read offline by checkpoint_reader.py).
- checkpoint_reader.py / reshard.py: any saved step read offline as full reference-named tensors; resuming it
  under another layout (weights, fp32 masters, Adam moments, step re-sliced).
- fp8.py: `train.fp8`, torchao's float8 linears for the blocks' projections (CUDA, compute capability >= 8.9).
- describe.py: the dry-run / plan description and memory estimate (the rules live in pretrain/config.py).

`pretrain.engine` puts these together behind `build_engine`; `pretrain.distributed` creates the groups.
"""
