"""Training throughput, MFU and peak memory of a config on this machine, next to the planner's memory estimate.

    python benchmarks/mfu.py --config configs/1b.yaml --nproc 1 --steps 30 [--set k=v ...] \
        [--out benchmarks/results/mfu_<gpu>_<config>.json]

Runs the real `pretrain train` (torchrun, DeepSpeed, the configured layout) for --steps steps on shards made from
the shipped sample corpus (vocabulary padded up to --vocab so the output layer costs what a real tokenizer's
would), with no checkpoints and no tracking, then reads metrics.jsonl: medians over the steps after --warmup.
MFU uses PaLM's 6N + 12 L H Q T FLOPs per token against the device's dense bf16 peak (pretrain/telemetry/metrics.py);
on CPU it is reported as null. The JSON holds device, date, commit, the exact command and config.
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def shards(work: Path) -> Path:
    """Tokenizer + shards from the sample corpus, made once per work dir."""
    from data_pipeline import sample_corpus

    out = work / "data" / "shards"
    if (out / "manifest.json").exists():
        return out
    py = [sys.executable, "-m", "data_pipeline"]
    tok = work / "data" / "tok"
    for args in (["train-tokenizer", "--input", sample_corpus.path(), "--vocab-size", "1024", "--out", str(tok)],
                 ["prepare", "--input", sample_corpus.path(), "--tokenizer", str(tok), "--out", str(out),
                  "--no-progress", "--overwrite"]):
        subprocess.run(py + args, check=True, cwd=REPO)
    return out


def train_argv(config: str, overrides: list[str]) -> list[str]:
    """The arguments after `python -m` (or a launcher's `-m`) for `pretrain train` with these overrides."""
    return ["pretrain", "train", "--config", config, *(arg for item in overrides for arg in ("--set", item))]


def run_train(config: str, overrides: list[str]) -> str:
    """`pretrain train` on one process, quietly; its stderr (the save lines), or exit with its tail on failure."""
    proc = subprocess.run([sys.executable, "-m", *train_argv(config, overrides)], cwd=REPO, capture_output=True,
                          text=True)
    if proc.returncode != 0:
        sys.exit(proc.stderr[-3000:])
    return proc.stderr


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True)
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    ap.add_argument("--nproc", type=int, default=1, help="ranks on this machine (torchrun --nproc-per-node)")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5, help="first steps left out of the medians")
    ap.add_argument("--vocab", type=int, default=32000, help="model.vocab_size (>= the sample tokenizer's)")
    ap.add_argument("--work", type=Path, default=REPO / "runs" / "bench", help="scratch directory")
    ap.add_argument("--out", type=Path, default=None, help="write the results JSON here")
    args = ap.parse_args()
    if args.steps <= args.warmup:
        ap.error("--steps must be larger than --warmup")

    import torch

    from benchmarks.provenance import provenance, report
    from pretrain.config import load_config
    from pretrain.telemetry.metrics import read
    from pretrain.plan.describe import estimate
    from pretrain.run.resolved import resolve_run

    run_dir = args.work / "run"
    shutil.rmtree(run_dir, ignore_errors=True)
    overrides = [f"data.path={shards(args.work)}", f"model.vocab_size={args.vocab}", f"checkpoint.dir={run_dir}",
                 "checkpoint.resume=none", "checkpoint.every=0", "checkpoint.final=false", "tracking.enabled=false",
                 "train.eval_every=0", f"train.max_steps={args.steps}", "train.log_every=1", *args.overrides]
    cfg = load_config(args.config, overrides)
    # The training's own start-up checks (layout, shards, tokenizer), then the planner's estimate of that run.
    plan = estimate(cfg, args.nproc, run=resolve_run(cfg, args.nproc))

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.nproc}",
           "-m", *train_argv(args.config, overrides)]
    t0 = time.time()
    code = subprocess.run(cmd, cwd=REPO).returncode  # a failed run still gets its JSON, with what it measured
    wall = time.time() - t0

    records = [r for r in read(run_dir) if r["step"] > args.warmup and not r.get("skipped")]

    def median(key: str) -> float | None:
        values = [r[key] for r in records if r.get(key) is not None]
        return statistics.median(values) if values else None

    cuda = torch.cuda.is_available()
    result = {
        **provenance("mfu", torch.cuda.get_device_name() if cuda else "cpu", cfg.model_dump(mode="json")),
        "nproc": args.nproc,
        "steps_measured": len(records),
        "tokens_per_s": median("tokens_per_s"),
        "tokens_per_s_per_rank": (median("tokens_per_s") or 0) / args.nproc,
        "tflops_per_rank": median("tflops"),
        "mfu": median("mfu"),
        "peak_mem_gib": max((r["peak_mem_gib"] for r in records), default=None),
        "planned_mem_gib": plan.total / 2**30,
        "loss_first_last": [records[0]["loss"], records[-1]["loss"]] if records else None,
        "wall_s": wall,
        "exit_code": code,
    }
    report(result, args.out)
    print(f"\n{result['device']}, {args.nproc} rank(s), {cfg.model.flavor}: {_fmt(result['tokens_per_s'], ',.0f')} "
          f"tokens/s, {_fmt(result['tflops_per_rank'], '.3g')} TFLOP/s per rank, MFU "
          f"{_fmt(result['mfu'], '.1%', 'n/a (no GPU peak)')}, peak memory {_fmt(result['peak_mem_gib'], '.2f')} GiB "
          f"(planned {result['planned_mem_gib']:.2f} GiB)")
    if code != 0 or not records:
        print(f"mfu: the training exited {code} with {len(records)} step(s) after the warm-up", file=sys.stderr)
        return 1
    return 0


def _fmt(value: float | None, spec: str, missing: str = "n/a") -> str:
    return missing if value is None else format(value, spec)


if __name__ == "__main__":
    sys.exit(main())
