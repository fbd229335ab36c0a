"""Parallelism for the LLaMA model: the one place that decides how the model is split.

- tensor.py: megatron-core Column/Row/VocabParallel layers + the vocab-parallel chunked loss as a `LayerFactory`
  (the model asks, this answers); sequence-parallel adaptation and its norm-gradient hook (CUDA).
- pipeline.py: the model as a DeepSpeed `PipelineModule` (embedding, blocks, norm + head, loss), name mapping back
  to the reference model, and a check that DeepSpeed's topology and megatron-core agree on every rank's groups.
- mpu.py: DeepSpeed's six "model parallel unit" questions answered from megatron-core's `parallel_state`.
- optimizer.py: AdamW param groups (no decay on vectors) and the ZeRO-0/fp32 norm/clip/skip guard.
- consolidate.py: TP shards + PP stages + ZeRO-3 partitions -> one reference-named state dict on rank 0 (the
  tests' live-engine oracle; saved steps are read offline by pretrain/checkpoint/reader.py).
- fp8.py: `train.fp8`, torchao's float8 linears for the blocks' projections (CUDA, compute capability >= 8.9).

`pretrain.train.engine` puts these together behind `build_engine`; `pretrain.run.distributed` creates the groups.
"""
