"""Checkpoints, in one place: how a step is written, trusted, chosen, read back and converted.

    commit.py     the commit protocol (temp dir, per-rank files, manifest of sizes and hashes written last,
                  `latest`), verification, the choice of a step to resume, rank state and RNG; background saves
    files.py      how one file is written (hashed as it goes) and read (no code runs from a pickle)
    records.py    what `latest`, manifest.json and meta.json may say (typed, paths inside the step, no symlinks)
    manager.py    CheckpointManager: the train loop's one handle (run lock, start point, save, wait)
    run_lock.py   one launch per checkpoint directory
    resume.py     where a launch starts: fresh, `model.init_from`, a checkpoint of this or another layout
    reader.py     DeepSpeed's files of any layout read offline, tensor by tensor (export, generate, re-slicing)
    reshard.py    a checkpoint of another layout re-sliced into a live engine
    weights.py    full-tensor weights from a checkpoint or an imported Hugging Face model
    convert.py    DeepSpeed's universal checkpoint format, written from any step
    average.py    the mean of several checkpoints' weights (`pretrain average`), written as an import

Hugging Face import and export live beside it in pretrain/hf/.
"""
from pretrain.checkpoint.commit import (CheckpointError, CheckpointWriteError, Collective, Loaded, Meta, PendingSave,
                                        atomic_write, choose, list_steps, load, point_latest, read_meta,
                                        read_rank_file, remove_stale_temps, resolve_checkpoint_arg, run_of, save,
                                        save_in_background, verify, write_manifest)
from pretrain.run.paths import CONFIG, LATEST, MANIFEST, META, TOKENIZER_DIR, rank_file, step_dir_name

__all__ = ["CONFIG", "LATEST", "MANIFEST", "META", "TOKENIZER_DIR", "CheckpointError", "CheckpointWriteError",
           "Collective", "Loaded", "Meta", "PendingSave", "atomic_write", "choose", "list_steps", "load",
           "point_latest", "rank_file", "read_meta", "read_rank_file", "remove_stale_temps", "resolve_checkpoint_arg",
           "run_of", "save", "save_in_background", "step_dir_name", "verify", "write_manifest"]
