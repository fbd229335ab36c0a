"""Whether a run fits the host it starts on: the planner's memory estimate against this host's GPU or RAM, asked
by `pretrain train` at start and by its `--dry-run` (`pretrain plan` judges a cluster's GPUs in describe.py)."""
from __future__ import annotations

import os
import subprocess
import sys

import psutil

from pretrain.config import Config, ConfigError
from pretrain.plan.describe import Kernels, estimate, size_text
from pretrain.run.resolved import ResolvedRun


def check_memory(cfg: Config, run: ResolvedRun) -> None:
    """Refuse, in one line, a run whose per-rank memory estimate (`pretrain.plan.describe.estimate`, what the
    dry run prints) exceeds what this host has: a CUDA run's one GPU, a CPU run's RAM shared by the ranks on this
    host (LOCAL_WORLD_SIZE, else the whole world). Only a certain failure is refused (the estimate against the
    whole memory, no headroom): a seq_len or shape off by orders of magnitude used to pass the dry run and then
    crash in an allocation or overflow. Where the device is not known here (a CUDA run, or train.device=auto in a
    dry run, where no GPU answers: a login node) the run is checked at its start."""
    gpu_bytes = _gpu_memory_here() if cfg.train.device != "cpu" else None
    on_gpu = _on_gpu(cfg, gpu_bytes)
    if on_gpu is None or (on_gpu and gpu_bytes is None):
        return
    e = estimate(cfg, run.layout.world, run=run, kernels=None if on_gpu else Kernels.cpu())
    ranks = 1 if on_gpu else _ranks_here(run.layout.world)
    have = gpu_bytes if on_gpu else psutil.virtual_memory().total
    if e.total * ranks <= have:
        return
    m, t = run.model, cfg.train
    where = (f"this host's GPU ({size_text(have)})" if on_gpu else
             f"this host's {size_text(have)} of RAM ({ranks} CPU rank{'s' if ranks > 1 else ''}"
             + ("; train.device=auto and torch sees no GPU" if cfg.train.device == "auto" else "") + ")")
    raise ConfigError(f"the run cannot fit: ~{size_text(e.total)} per rank = activations "
                      f"{size_text(e.activations + e.transient + e.buffers)} (train.seq_len={t.seq_len} x "
                      f"train.micro_batch_size={t.micro_batch_size}) + model states {size_text(e.model_states)} "
                      f"(model.dim={m.dim}, model.n_layers={m.n_layers}, model.ffn_hidden_dim={m.hidden_dim}, "
                      f"model.vocab_size={run.vocab_size} padded to {m.vocab_size}), more than {where}; shrink "
                      "them, or split the model over parallel.tp / parallel.pp / parallel.zero_stage, or a long "
                      f"sequence over parallel.cp (each rank then holds train.seq_len / cp tokens; now cp="
                      f"{run.layout.cp})")


def _gpu_memory_here() -> int | None:
    """Bytes of the largest GPU on this host, from nvidia-smi (a dry run imports no torch, and torch's own query
    would open a CUDA context before the rank picks its device); None where none answers or none is visible. The
    largest: a refusal must be certain, and nvidia-smi's numbering need not be CUDA_VISIBLE_DEVICES'."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", "0").strip() in ("", "-1"):
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=30)
        mib = [float(x) for x in out.stdout.split()] if out.returncode == 0 else []
    except (OSError, subprocess.SubprocessError, ValueError):
        return None
    return int(max(mib) * 1024**2) if mib else None


def _ranks_here(world: int) -> int:
    """CPU ranks sharing this host's RAM: the launcher's LOCAL_WORLD_SIZE, else (a dry run) the whole world."""
    local = os.environ.get("LOCAL_WORLD_SIZE", "")
    return min(world, int(local)) if local.isdigit() and int(local) > 0 else world


def _on_gpu(cfg: Config, gpu_bytes: int | None) -> bool | None:
    """Whether this run computes on CUDA: as train.device says; for auto, as torch sees it where torch is loaded
    (the run starts in this process), else (a dry run) True where a GPU answers here and None (not known) where
    none does: a dry run on a login node checks a config meant for GPU nodes, which their start checks again."""
    if cfg.train.device != "auto":
        return cfg.train.device == "cuda"
    torch = sys.modules.get("torch")
    if torch is not None:
        return bool(torch.cuda.is_available())
    return True if gpu_bytes is not None else None
