"""Peak memory of `pretrain export-hf` against the size of the weights it exports.

    python benchmarks/export_rss.py --checkpoint runs/350m/step_1 --max-shard-size 5GB 200MB \
        --json benchmarks/results/export_rss_cpu.json

Runs the real CLI as a child process once per shard size, polls its /proc/<pid>/status every 20 ms and keeps the
peak of VmRSS (what `/usr/bin/time -v` calls maximum resident set size), RssAnon (memory the process allocated:
tensors, shards being built) and RssFile (pages of the memory-mapped checkpoint files, which the kernel can drop
at any time). A child that only imports what export imports gives the interpreter + library baseline. Weight
sizes come from the checkpoint's resolved model shape.
"""
from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
_FIELDS = ("VmRSS", "RssAnon", "RssFile")


def _status(pid: int) -> dict[str, int]:
    out = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in _FIELDS:
                out[key] = int(value.split()[0]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        pass
    return out


def peak_memory(cmd: list[str]) -> tuple[dict[str, int], float]:
    """Peak of each /proc status field while `cmd` runs (bytes), and its wall time; raises if it fails."""
    t0 = time.time()
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = dict.fromkeys(_FIELDS, 0)
    while proc.poll() is None:
        for k, v in _status(proc.pid).items():
            peak[k] = max(peak[k], v)
        time.sleep(0.02)
    out, err = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} exited {proc.returncode}:\n{err[-3000:]}")
    return peak, time.time() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--max-shard-size", nargs="+", default=["5GB"])
    ap.add_argument("--json", default=None, help="write the result here")
    ap.add_argument("--made-by", default=None, help="the command that made the checkpoint (recorded as given)")
    args = ap.parse_args()

    sys.path.insert(0, str(REPO))
    from pretrain.checkpoint.reader import MAP_BUDGET
    from pretrain.checkpoint.weights import open_weights

    step_dir, source = open_weights(args.checkpoint)
    run = source.run
    params = run.model.num_params(run.model.vocab_size)
    largest = max(x * y for x, y in [(run.model.vocab_size, run.model.dim), (run.model.hidden_dim, run.model.dim)])
    export_bytes_per = 2 if run.dtype == "bf16" else 4
    py = sys.executable
    baseline, _ = peak_memory([py, "-c", "import os; os.environ.setdefault('DS_ACCELERATOR', 'cpu'); "
                                         "import pretrain.cli, pretrain.hf.export, pretrain.checkpoint.weights, "
                                         "pretrain.checkpoint.reader, data_pipeline.tokenizer"])
    runs = []
    for size in args.max_shard_size:
        out = Path(tempfile.mkdtemp(prefix="export_rss_")) / "hf"
        cmd = [py, "-m", "pretrain", "export-hf", "--checkpoint", str(step_dir), "--out", str(out),
               "--max-shard-size", size]
        try:
            peak, wall = peak_memory(cmd)
            files = sorted(out.glob("*.safetensors"))
            runs.append({"max_shard_size": size, "command": " ".join(["python", *cmd[1:]]), "wall_s": round(wall, 1),
                         "peak_rss_bytes": peak["VmRSS"], "peak_rss_anon_bytes": peak["RssAnon"],
                         "peak_rss_file_bytes": peak["RssFile"], "output_files": len(files),
                         "largest_output_file_bytes": max(f.stat().st_size for f in files),
                         "output_bytes": sum(f.stat().st_size for f in files)})
        finally:
            shutil.rmtree(out.parent, ignore_errors=True)
        print(json.dumps(runs[-1]), flush=True)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    result = {
        "what": "peak memory of `pretrain export-hf` (streamed: one tensor + one output shard) vs weight size",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "commit": commit,
        "device": f"CPU ({platform.processor() or platform.machine()}), {Path('/proc/cpuinfo').read_text().count('processor')} cores",
        "checkpoint": {"path": str(step_dir), "layout": f"tp {run.layout.tp} x pp {run.layout.pp} x dp "
                       f"{run.layout.dp}, ZeRO-{run.zero_stage}", "dtype": run.dtype, "params": params,
                       "vocab_padded": run.model.vocab_size, "dim": run.model.dim, "n_layers": run.model.n_layers,
                       "made_by": args.made_by},
        "weights_fp32_bytes": params * 4, "weights_export_dtype_bytes": params * export_bytes_per,
        "largest_tensor_fp32_bytes": largest * 4,
        "baseline_imports_rss_bytes": baseline["VmRSS"],
        "command": "python benchmarks/export_rss.py --checkpoint " + args.checkpoint + " --max-shard-size "
                   + " ".join(args.max_shard_size) + (f" --json {args.json}" if args.json else ""),
        "runs": runs,
        "notes": "peak_rss = VmRSS (= /usr/bin/time -v maximum resident set size). peak_rss_anon: memory the export "
                 "allocated (interpreter + libraries + one output shard + the tensor being converted). "
                 "peak_rss_file: pages of the shared libraries and of the checkpoint files that CheckpointReader "
                 "memory-maps (torch.load mmap=True), which it unmaps after every MAP_BUDGET bytes read "
                 f"({MAP_BUDGET >> 20} MiB), so at most that plus one parameter's pieces. "
                 "baseline_imports_rss: a process that only imports the same modules.",
    }
    text = json.dumps(result, indent=1)
    print(text)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
