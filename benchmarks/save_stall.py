"""How long a checkpoint stops training: background saves (the default) against foreground ones.

    python benchmarks/save_stall.py [--config configs/350m.yaml] [--steps 4] [--every 2] \
        [--out benchmarks/results/save_stall_cpu_350m.json]

Runs the real `pretrain train` twice on one rank (the preset's model and dtype; a small micro-batch and sequence so
a CPU can step it), saving every --every steps, once with `checkpoint.background=true` and once with false, and
reads each save's line `step_<N> committed: training paused P s, the save took T s` (background) and the
foreground save's duration from the same line. A background save pauses training only while the state is copied
to host memory; writing, hashing and committing go on while the next steps run.
"""
from __future__ import annotations

import argparse
import re
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

LINE = re.compile(r"(step_\d+) committed: training paused ([\d.]+) s, the save took ([\d.]+) s")


def run(args: argparse.Namespace, shards: Path, background: bool) -> list[dict]:
    run_dir = args.work / ("background" if background else "foreground")
    shutil.rmtree(run_dir, ignore_errors=True)
    overrides = [f"data.path={shards}", f"model.vocab_size={args.vocab}", f"checkpoint.dir={run_dir}",
                 "checkpoint.resume=none", f"checkpoint.every={args.every}", "checkpoint.final=false",
                 f"checkpoint.background={str(background).lower()}", "tracking.enabled=false", "train.eval_every=0",
                 f"train.max_steps={args.steps}", "train.log_every=1", "train.micro_batch_size=1",
                 "train.grad_accum=1", f"train.seq_len={args.seq_len}", "data.num_workers=0", "train.device=cpu"]
    from benchmarks.mfu import run_train

    saves = [{"checkpoint": m.group(1), "paused_s": float(m.group(2)), "save_s": float(m.group(3))}
             for m in LINE.finditer(run_train(args.config, overrides))]
    size = sum(p.stat().st_size for p in run_dir.glob("step_*/**/*") if p.is_file())
    for s in saves:
        s["bytes"] = size // max(len(list(run_dir.glob("step_*"))), 1)
    return saves


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/350m.yaml")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--every", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--vocab", type=int, default=32000, help="model.vocab_size (>= the sample tokenizer's)")
    ap.add_argument("--work", type=Path, default=REPO / "runs" / "bench_save", help="scratch directory")
    ap.add_argument("--out", type=Path, default=None, help="write the results JSON here")
    args = ap.parse_args()

    from benchmarks.mfu import shards
    from benchmarks.provenance import provenance, report
    from pretrain.config import load_config

    data = shards(args.work)
    background, foreground = run(args, data, True), run(args, data, False)
    cfg = load_config(args.config, [])
    result = {**provenance("save_stall", "cpu", cfg.model_dump(mode="json")),
              "background": background, "foreground": foreground,
              "stall_fraction": [b["paused_s"] / b["save_s"] for b in background]}
    for b, f in zip(background, foreground):
        print(f"{b['checkpoint']} ({b['bytes'] / 2**30:.2f} GiB): background save paused training {b['paused_s']:.2f} s "
              f"of {b['save_s']:.2f} s ({b['paused_s'] / b['save_s']:.0%}); a foreground save paused it "
              f"{f['save_s']:.2f} s")
    report(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
