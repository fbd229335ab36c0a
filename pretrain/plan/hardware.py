"""The one hardware table: per GPU model, its dense bf16 tensor-core peak (TFLOP/s, from the vendors' datasheets: the
MFU denominator) and its memory as torch.cuda.get_device_properties().total_memory reports it (GiB: what the
planner fits a run into); and the default per-GPU link bandwidths of a cluster.

A GPU is found by substring of its name (torch.cuda.get_device_name(), nvidia-smi, or `--gpu h100`); the first
match wins, so the more specific names come first ("GH200" before "H200", "H100 PCIe" before "H100")."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GPU:
    name: str
    peak_tflops: float
    memory_gib: float


GPUS: list[GPU] = [
    GPU("GH200", 989.0, 94.5),
    GPU("H200", 989.0, 139.8),
    GPU("H100 PCIe", 756.0, 79.2),
    GPU("H100 NVL", 835.0, 93.1),
    GPU("H100", 989.0, 79.2),  # SXM
    GPU("B200", 2250.0, 178.4),
    GPU("A100", 312.0, 79.2),
    GPU("A10G", 70.0, 22.1),
    GPU("L40S", 362.0, 44.4),
    GPU("L4", 121.0, 22.0),
    GPU("V100", 125.0, 31.7),  # fp16 tensor cores (no bf16)
    GPU("MI300X", 1307.0, 191.5),
]


@dataclass(frozen=True)
class Links:
    """Per-GPU bandwidths in GB/s, one direction: NVLink inside a node, InfiniBand (or RoCE) between nodes."""
    nvlink: float = 450.0   # H100 SXM NVLink 4: 900 GB/s both directions
    ib: float = 50.0        # one 400 Gb/s NDR port per GPU


def gpu(name: str) -> GPU | None:
    """The table's row for a GPU name ("NVIDIA H100 80GB HBM3", or just "h100"); None when unknown."""
    return next((g for g in GPUS if g.name.lower() in name.lower()), None)


def peak_tflops_for(name: str) -> float | None:
    g = gpu(name)
    return g.peak_tflops if g else None


def gpu_memory_gib(name: str) -> float | None:
    g = gpu(name)
    return g.memory_gib if g else None


def known_gpus() -> str:
    return ", ".join(g.name for g in GPUS)
