"""Planning without a GPU: per-rank memory and step time for a config on a cluster shape, the layout ranking, and
the hardware table (peak TFLOP/s, memory and links per GPU model). Torch-free: `pretrain plan` and `--dry-run` run
on a login node."""
