"""Raw text corpus -> tokenizer -> webdataset token shards -> exactly resumable streaming loader.

Modules, one job each: `sources` (read JSONL/Parquet/txt documents), `tokenizer` (train/load, batch encode),
`shard_writer` (tar shards written under a temp name), `manifest` (what the shards contain), `prepare`
(the parallel corpus -> shards job), `verify` / `inspect` (check and look at shards), `loader` (the training
loader), `cli` (`pretrain-data`).
"""
