"""The side-by-side peer: transformers' LlamaForCausalLM (SDPA attention) trained by DeepSpeed with the same shape,
batch and DeepSpeed config as `pretrain train` would use for a config, on this machine, one rank.

    python benchmarks/peer_hf_deepspeed.py --config configs/1b.yaml --vocab 128256 --steps 10 --warmup 3 \
        [--set k=v ...] [--out benchmarks/results/peer_<gpu>_<config>.json]

Shape: the resolved model of the config (dim, layers, heads, kv heads, FFN width, vocab padded as ours is, tied
embeddings, RoPE base). DeepSpeed config: `pretrain.train.engine.deepspeed_config` of the same config (ZeRO stage, bf16
with fp32 master weights and fp32 gradient accumulation, micro-batch, accumulation, clipping). Optimizer: torch
AdamW (fused on CUDA), as ours. Recompute: transformers offers only whole-layer gradient checkpointing, used when
the config asks for `full`; `selective` has no transformers equivalent and runs without (the JSON says which).
Tokens are random (throughput does not depend on them). tokens/s is the median over the steps after --warmup;
peak memory is torch's max allocated on CUDA, the max RSS on CPU. MFU uses the same FLOPs formula and GPU peak
as benchmarks/mfu.py, so the two JSONs compare directly.
"""
from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Not this script's directory: its kernels.py would shadow the `kernels` package transformers looks for.
sys.path[0] = str(REPO)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def hf_config(args, seq_len: int):
    """transformers' LlamaConfig of our resolved model args."""
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=args.vocab_size, hidden_size=args.dim, intermediate_size=args.hidden_dim,
                       num_hidden_layers=args.n_layers, num_attention_heads=args.n_heads,
                       num_key_value_heads=args.kv_heads, rms_norm_eps=args.norm_eps, rope_theta=args.rope_theta,
                       max_position_embeddings=max(seq_len, args.max_seq_len), tie_word_embeddings=args.tie_embeddings,
                       attn_implementation="sdpa", use_cache=False)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True)
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3, help="first steps left out of the median")
    ap.add_argument("--vocab", type=int, default=32000, help="model.vocab_size")
    ap.add_argument("--out", type=Path, default=None, help="write the results JSON here")
    opts = ap.parse_args()
    if opts.steps <= opts.warmup:
        ap.error("--steps must be larger than --warmup")

    import deepspeed
    import torch
    from transformers import LlamaForCausalLM

    from benchmarks.provenance import provenance, report
    from pretrain.config import load_config
    from pretrain.train.engine import deepspeed_config
    from pretrain.model.flops import flops_per_token
    from pretrain.telemetry.metrics import device_peak_tflops, peak_memory_gib
    from pretrain.plan.describe import planned_run

    cfg = load_config(opts.config, [f"model.vocab_size={opts.vocab}", "parallel.tp=1", "parallel.pp=1",
                                    *opts.overrides])
    run = planned_run(cfg, 1)
    args, T, t = run.model, cfg.train.seq_len, cfg.train
    cuda = torch.cuda.is_available()
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(_free_port()))
    torch.distributed.init_process_group("nccl" if cuda else "gloo")
    device = torch.device("cuda" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(0)
    torch.manual_seed(t.seed)

    model = LlamaForCausalLM(hf_config(args, T))
    recompute = cfg.model.activation_checkpointing == "full"
    if recompute:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    o = cfg.optim
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": o.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=o.lr, betas=(o.beta1, o.beta2),
                                  eps=o.eps, fused=cuda or None)
    ds = deepspeed_config(cfg, dp=1)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds, dist_init_required=False)

    g = torch.Generator().manual_seed(0)
    tokens_per_step = t.micro_batch_size * t.grad_accum * T
    times, losses = [], []
    for _ in range(opts.steps):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(t.grad_accum):
            x = torch.randint(0, run.vocab_size, (t.micro_batch_size, T), generator=g).to(device)
            loss = engine(input_ids=x, labels=x).loss  # transformers shifts the labels itself
            engine.backward(loss)
            engine.step()
        losses.append(float(loss.detach()))  # a host read per step, after its last micro-batch (as ours logs)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)

    step_s = statistics.median(times[opts.warmup:])
    tokens_per_s = tokens_per_step / step_s
    peak = device_peak_tflops(t.peak_tflops)
    tflops = flops_per_token(args, T, args.vocab_size) * tokens_per_s / 1e12
    result = {
        **provenance("peer_hf_deepspeed", torch.cuda.get_device_name() if cuda else "cpu",
                     cfg.model_dump(mode="json")),
        "system": "transformers LlamaForCausalLM (sdpa) + DeepSpeed",
        "deepspeed_config": ds,
        "recompute": "full (whole layers)" if recompute else "none",
        "params": sum(p.numel() for p in model.parameters()),
        "tokens_per_step": tokens_per_step,
        "step_s_median": step_s,
        "tokens_per_s": tokens_per_s,
        "tflops": tflops,
        "mfu": tflops / peak if peak else None,
        "peak_mem_gib": peak_memory_gib(),
        "losses": losses,
        "versions": {"torch": torch.__version__, "deepspeed": deepspeed.__version__,
                     "transformers": __import__("transformers").__version__},
    }
    mfu = f"{result['mfu']:.1%}" if result["mfu"] is not None else "n/a (no GPU peak)"
    print(f"\n{result['device']}, peer {result['system']}, {cfg.model.flavor}: {tokens_per_s:,.0f} tokens/s, "
          f"MFU {mfu}, peak memory {result['peak_mem_gib']:.2f} GiB")
    report(result, opts.out)
    torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
