"""`pretrain convert-checkpoint --to universal`: a checkpoint of any layout -> DeepSpeed's universal format.

DeepSpeed's Universal Checkpointing keeps, per parameter, one folder `zero/<name>/` with the whole (un-sliced)
fp32 master weight and Adam moments, each a `{"param": tensor, "cat_dim": d, "vocab_tensor": bool}` dict in
`fp32.pt`, `exp_avg.pt`, `exp_avg_sq.pt`, and the optimizer step in `step.pt`: the files its loader
(DeepSpeed 0.19's `load_hp_checkpoint_state`) slices for any TP degree and ZeRO
partition. `ds_to_universal` builds them from megatron's `universal_checkpoint_info` patterns, which our engine
does not write; we build the same files from `CheckpointReader` instead (which knows every slicing from the
resolved run), with reference names (`layers.2.attention.wq.weight`, the same in every layout):
- `cat_dim`: the dimension megatron-core splits a tensor-parallel parameter along (0 column/vocab, 1 row);
  absent for replicated parameters (norm weights), which DeepSpeed then copies whole;
- vocabulary matrices are cut to the tokenizer's rows with `vocab_tensor: true`, so DeepSpeed re-pads them for
  the target's TP degree (padding is 128 x tp) -- padded rows are never targets.
Plus `universal.json` (source checkpoint, step, model shape, names in model order) beside `zero/`.

Streaming: one parameter at a time (one full tensor in memory, plus its file); the output is written under a
temporary name and renamed when complete. (`pretrain train` does not go through this format: it re-slices
straight from the original files, see pretrain/checkpoint/reshard.py.)
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from pretrain.model.init import VOCAB_ROWS
from pretrain.output_dir import refuse_non_empty, written_whole
from pretrain.checkpoint.reader import KINDS, CheckpointReader

_FILE = {"param": "fp32", "exp_avg": "exp_avg", "exp_avg_sq": "exp_avg_sq"}  # DeepSpeed's file names


def to_universal(step_dir: str | Path, out: str | Path) -> Path:
    reader = CheckpointReader(step_dir)
    out = Path(out)
    refuse_non_empty(out)
    step = torch.tensor(float(reader.optimizer_step()))
    rows = reader.run.vocab_size  # the tokenizer's vocabulary: rows beyond it are padding
    with written_whole(out) as tmp:
        for name in reader.names():
            folder = tmp / "zero" / name
            folder.mkdir(parents=True)
            dim = reader.tp_split_dim(name)
            for kind in KINDS:
                tensor = reader.tensor(name, kind)
                entry: dict = {"param": tensor[:rows].clone() if name in VOCAB_ROWS else tensor}
                if dim is not None:
                    entry["cat_dim"] = dim
                if name in VOCAB_ROWS:
                    entry["vocab_tensor"] = True
                torch.save(entry, folder / f"{_FILE[kind]}.pt")
                del tensor, entry
            torch.save(step, folder / "step.pt")
        info = {"format": "deepspeed-universal", "source": str(Path(step_dir).resolve()), "step": reader.step,
                "optimizer_step": int(step), "vocab_rows": rows, "names": reader.names(),
                "resolved": reader.run.to_dict()}
        (tmp / "universal.json").write_text(json.dumps(info, indent=1, default=str))
    return out
