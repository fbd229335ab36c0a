"""What watching a run costs: MLflow's system metrics and an idle spike detector, on the step time.

    python benchmarks/monitor_overhead.py [--steps 200] [--rounds 3] \
        [--out benchmarks/results/monitor_overhead_cpu.json]

Runs the real `pretrain train` (the debug model of configs/debug.yaml, one rank, CPU, MLflow tracking into a local
store) in three variants, interleaved over --rounds so that drift of the machine hits all alike:
  baseline          tracking on, system metrics off, train.spike off
  system_metrics    + MLflow's system-metrics thread sampling every --interval s (the default is 30 s; a short
                    interval bounds the cost from above)
  spike_detector    + train.spike on with the default 100-step window and threshold (idle: no spike happens)
and compares the median `step_time_s` of metrics.jsonl (the first --warmup steps and the detector's window-fill
steps are left out), beside the spread of the per-run medians of each variant: on a shared 2-core machine that
spread is the noise floor an overhead must rise above. It also times `SpikeDetector.observe` alone, the
detector's whole per-step work.
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

VARIANTS = {
    "baseline": [],
    "system_metrics": ["tracking.system_metrics_s={interval}"],
    "spike_detector": ["train.spike.enabled=true"],
}


def run(args: argparse.Namespace, shards: Path, name: str, round_: int) -> list[float]:
    run_dir = args.work / f"{name}_{round_}"
    shutil.rmtree(run_dir, ignore_errors=True)
    overrides = [f"data.path={shards}", f"checkpoint.dir={run_dir}", "checkpoint.resume=none",
                 "checkpoint.every=1000000", "checkpoint.final=false", "tracking.enabled=true",
                 "tracking.system_metrics_s=0", "train.eval_every=0", f"train.max_steps={args.steps}",
                 "train.log_every=1000", "train.device=cpu", "data.val_path=null"]
    overrides += [o.format(interval=args.interval) for o in VARIANTS[name]]
    from benchmarks.mfu import run_train
    from pretrain.telemetry import metrics

    run_train("configs/debug.yaml", overrides)
    recs = metrics.read(run_dir)
    return [r["step_time_s"] for r in recs[args.warmup:]]


def observe_cost_us(window: int = 100, calls: int = 20000) -> float:
    """Microseconds per `SpikeDetector.observe` on a full window (the detector's whole per-step work)."""
    from pretrain.config import SpikeSection
    from pretrain.train.spikes import SpikeDetector

    d = SpikeDetector(SpikeSection(enabled=True, window=window))
    for i in range(window):
        d.observe(i, 3.0 + 0.01 * (i % 7), 1.0 + 0.01 * (i % 5), False)
    t = time.perf_counter()
    for i in range(calls):
        d.observe(window + i, 3.0 + 0.01 * (i % 7), 1.0 + 0.01 * (i % 5), False)
    return (time.perf_counter() - t) / calls * 1e6


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=110, help="first steps left out (the detector's window fills "
                    "in the first 100)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--interval", type=float, default=1.0, help="system metrics sampling interval, seconds")
    ap.add_argument("--work", type=Path, default=REPO / "runs" / "bench_monitor", help="scratch directory")
    ap.add_argument("--out", type=Path, default=None, help="write the results JSON here")
    args = ap.parse_args()

    from benchmarks.mfu import shards
    from benchmarks.provenance import provenance, report
    from pretrain.config import load_config

    data = shards(args.work)
    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    per_run: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for r in range(args.rounds):
        for name in VARIANTS:
            steps = run(args, data, name, r)
            times[name] += steps
            per_run[name].append(statistics.median(steps))
    medians = {name: statistics.median(t) for name, t in times.items()}
    base = medians["baseline"]
    result = {**provenance("monitor_overhead", "cpu", load_config("configs/debug.yaml", []).model_dump(mode="json")),
              "steps_per_run": args.steps, "rounds": args.rounds, "system_metrics_interval_s": args.interval,
              "median_step_time_s": medians, "per_run_median_step_time_s": per_run,
              "overhead": {name: medians[name] / base - 1 for name in VARIANTS if name != "baseline"},
              "spike_observe_us": observe_cost_us()}
    for name, m in medians.items():
        extra = "" if name == "baseline" else f" ({medians[name] / base - 1:+.1%} vs baseline)"
        runs = ", ".join(f"{v * 1e3:.2f}" for v in per_run[name])
        print(f"{name:15s} median step {m * 1e3:.2f} ms over {len(times[name])} steps{extra}; per run: {runs} ms")
    print(f"SpikeDetector.observe on a full 100-step window: {result['spike_observe_us']:.1f} us per step")
    report(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
