"""Fused Triton kernels vs their eager references: forward+backward time at LLaMA-3-8B layer shapes.

    python benchmarks/kernels.py [--tokens 8192] [--dtype bf16] [--out benchmarks/results/kernels_<gpu>.json]

Needs CUDA: timing Triton's CPU interpreter says nothing about a GPU. Each row is the median of --iters runs
after warmup, measured with CUDA events around forward + backward; peak memory is what the row allocates beyond
the inputs every row shares (the committed kernels_h200.json, from before that, counted its own inputs in). The
loss rows run at --ce-tokens (32768: the
1b preset's micro-batch of 8 x 4096): `cross_entropy` on given (tokens x vocab) logits, and `loss_head`, the
output projection + loss: eager = whole logits then the fp32 loss, fused = pretrain.kernels.linear_cross_entropy
(token chunks, Triton loss), which never holds the logits.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pretrain import kernels as eager  # noqa: E402


def _time(fn: Callable[[], torch.Tensor], iters: int) -> float:
    """Median milliseconds of fn() + backward."""
    for _ in range(3):
        fn().float().sum().backward()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn().float().sum().backward()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=8192, help="batch x sequence tokens per call")
    ap.add_argument("--dim", type=int, default=4096)
    ap.add_argument("--hidden", type=int, default=14336)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--ce-tokens", type=int, default=32768, help="tokens of the loss rows")
    ap.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--out", type=Path, default=None, help="write the results JSON here")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("benchmarks/kernels.py needs CUDA (the CPU path is Triton's interpreter, not a kernel to time)")

    from pretrain.kernels import triton_cross_entropy, triton_rmsnorm, triton_rope, triton_swiglu

    dev, dt = "cuda", torch.bfloat16 if args.dtype == "bf16" else torch.float32
    torch.manual_seed(0)
    T, D, H = args.tokens, args.dim, args.heads
    x = torch.randn(T, D, device=dev, dtype=dt, requires_grad=True)
    w = torch.ones(D, device=dev, dtype=dt, requires_grad=True)
    q = torch.randn(1, T, H, D // H, device=dev, dtype=dt, requires_grad=True)
    cos, sin = eager.rope_cache(D // H, T, 500000.0, device=dev)
    g = torch.randn(T, args.hidden, device=dev, dtype=dt, requires_grad=True)
    u = torch.randn(T, args.hidden, device=dev, dtype=dt, requires_grad=True)
    N = args.ce_tokens
    logits = torch.randn(N, args.vocab, device=dev, dtype=dt, requires_grad=True)
    targets = torch.randint(0, args.vocab, (N,), device=dev)
    hidden = (torch.randn(N, D, device=dev) * 0.02).to(dt).requires_grad_()
    head = (torch.randn(args.vocab, D, device=dev) * 0.02).to(dt).requires_grad_()

    ops = {
        "rms_norm": (lambda: eager.rms_norm(x, w, 1e-5), lambda: triton_rmsnorm.rms_norm(x, w, 1e-5)),
        "rope": (lambda: eager.apply_rope(q, cos, sin), lambda: triton_rope.apply_rope(q, cos, sin)),
        "swiglu": (lambda: eager.swiglu(g, u), lambda: triton_swiglu.swiglu(g, u)),
        "cross_entropy": (lambda: eager.cross_entropy(logits, targets),
                          lambda: triton_cross_entropy.cross_entropy(logits, targets)),
        "loss_head": (lambda: eager.cross_entropy(hidden @ head.t(), targets),
                      lambda: eager.linear_cross_entropy(hidden, head, targets, triton_cross_entropy.chunk_loss)),
    }
    rows = []
    for name, (ref_fn, fused_fn) in ops.items():
        for t in (x, w, q, g, u, logits, hidden, head):
            t.grad = None  # each row's peak counts its own gradients only
        base = torch.cuda.memory_allocated()  # every row's inputs: not this row's working memory
        torch.cuda.reset_peak_memory_stats()
        t_ref = _time(ref_fn, args.iters)
        mem_ref = torch.cuda.max_memory_allocated() - base
        torch.cuda.reset_peak_memory_stats()
        t_fused = _time(fused_fn, args.iters)
        mem_fused = torch.cuda.max_memory_allocated() - base
        rows.append(dict(op=name, eager_ms=t_ref, fused_ms=t_fused, speedup=t_ref / t_fused,
                         eager_peak_mib=mem_ref / 2**20, fused_peak_mib=mem_fused / 2**20))
        print(f"{name:14s} eager {t_ref:8.3f} ms  fused {t_fused:8.3f} ms  x{t_ref / t_fused:5.2f}  "
              f"peak {mem_ref / 2**20:8.0f} -> {mem_fused / 2**20:8.0f} MiB")
    from benchmarks.provenance import provenance, report

    config = vars(args) | {"out": str(args.out) if args.out else None}
    report({**provenance("kernels", torch.cuda.get_device_name(), config), "results": rows}, args.out)


if __name__ == "__main__":
    main()
