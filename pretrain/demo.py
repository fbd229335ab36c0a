"""`make demo`: the whole product on one CPU machine, no network, in a few minutes. Output under runs/demo/.

    1. train a byte-level BPE tokenizer on the sample corpus that ships with data_pipeline (1000 short stories)
    2. tokenize it into webdataset shards (+ a held-out split for validation loss)
    3. train the `debug` LLaMA on 2 CPU ranks (`python -m launch`: torchrun's agent, gloo) with DeepSpeed ZeRO-2 --
       and preempt it half-way with SIGUSR1 to the launcher, as SLURM would: the launcher forwards it, the ranks
       agree, checkpoint, and exit 42 (the requeue code), which the launcher exits with
    4. run the same command again: it resumes from `latest` and finishes (a continuation of the same loss curve
       and of the same MLflow run)
    5. sample from the final checkpoint with the KV-cache generator
Every step is the real command a user would type; the demo only strings them together and prints them.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from data_pipeline import sample_corpus
from pretrain.run.exits import EXIT_REQUEUE
from pretrain.run.paths import LATEST, METRICS_FILE, MLFLOW_DB, MLFLOW_DIR

ROOT = Path("runs/demo")
CONFIG = "configs/debug.yaml"
RANKS = 2
PREEMPT_AT = 150
VAL_DOCS = 50
_KEEP = ("[train]", "[checkpoint]", "[tracking]", "error", "Error")
_NOISE = ("[WARNING]", "DeepSpeed deepspeed.ops")  # DeepSpeed's start-up chatter on stdout (full text in the log)


def banner(text: str) -> None:
    print(f"\n=== {text}", flush=True)


def env() -> dict[str, str]:
    e = dict(os.environ)
    e.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    return e


def run(cmd: list[str], *, log: Path, allow: tuple[int, ...] = (0,), on_start=None) -> int:
    """Run a step, echo its stdout and our own stderr lines ([train] ...) as they come, keep stderr in `log`."""
    import threading

    print("$ " + " ".join(cmd), flush=True)
    with open(log, "w") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env())

        def pump_stderr() -> None:
            for line in proc.stderr:
                err.write(line)
                if line.startswith(_KEEP):
                    print("  " + line, end="", flush=True)

        pump = threading.Thread(target=pump_stderr, daemon=True)
        pump.start()
        if on_start:
            on_start(proc)
        for line in proc.stdout:
            if line.strip() and not any(noise in line for noise in _NOISE):
                print("  " + line, end="", flush=True)
        proc.wait()
        pump.join()
    if proc.returncode not in allow:
        print(log.read_text()[-4000:], file=sys.stderr)
        raise SystemExit(f"demo: step failed with exit {proc.returncode} (full log: {log})")
    return proc.returncode


def split_corpus(src: str, out: Path) -> tuple[Path, Path]:
    lines = Path(src).read_text(encoding="utf-8").splitlines()
    (out / "train.jsonl").write_text("\n".join(lines[:-VAL_DOCS]) + "\n", encoding="utf-8")
    (out / "val.jsonl").write_text("\n".join(lines[-VAL_DOCS:]) + "\n", encoding="utf-8")
    return out / "train.jsonl", out / "val.jsonl"


def preempt_when_halfway(run_dir: Path):
    """Send SIGUSR1 to the launcher once step PREEMPT_AT is logged, as `scancel --signal=USR1` / SLURM's --signal
    would; the launcher forwards it to the ranks. Runs on a thread so the output keeps streaming."""
    import threading

    def watch(proc: subprocess.Popen) -> None:
        metrics = run_dir / METRICS_FILE
        while proc.poll() is None:
            if metrics.exists() and len(metrics.read_text().splitlines()) >= PREEMPT_AT:
                proc.send_signal(signal.SIGUSR1)
                print(f"  [demo] step {PREEMPT_AT} reached: sent SIGUSR1 to the launcher (a preemption)", flush=True)
                return
            time.sleep(0.05)

    return lambda proc: threading.Thread(target=watch, args=(proc,), daemon=True).start()


def train_command(py: str) -> list[str]:
    """Step 3's command: the launcher, 2 ranks, the debug config, into the demo's own run dir."""
    return [py, "-m", "launch", "--nproc-per-node", str(RANKS), "--", "-m", "pretrain", "train", "--config", CONFIG,
            "--set", f"checkpoint.dir={ROOT / 'run'}", "--set", f"data.val_path={ROOT / 'val_shards'}",
            # 4 micro-batches per rank fit the VAL_DOCS held-out stories without reading any of them twice
            "--set", "train.eval_steps=4"]


def main() -> int:

    t0 = time.time()
    py = sys.executable
    if ROOT.exists():
        shutil.rmtree(ROOT)  # the demo always starts from scratch
    (ROOT / "corpus").mkdir(parents=True)
    logs = ROOT / "logs"
    logs.mkdir()
    banner("1. tokenizer: byte-level BPE on the shipped sample corpus")
    train_txt, val_txt = split_corpus(sample_corpus.path(), ROOT / "corpus")
    run([py, "-m", "data_pipeline", "train-tokenizer", "--input", str(train_txt), "--vocab-size", "1024",
         "--out", str(ROOT / "tok")], log=logs / "tokenizer.log")
    banner("2. shards: tokenize into webdataset .tar shards + manifest.json")
    for src, out in ((train_txt, "shards"), (val_txt, "val_shards")):
        run([py, "-m", "data_pipeline", "prepare", "--input", str(src), "--tokenizer", str(ROOT / "tok"),
             "--out", str(ROOT / out), "--shard-size-mb", "0.1", "--no-progress"], log=logs / f"prepare_{out}.log")

    train_cmd = train_command(py)
    run_dir = ROOT / "run"
    banner(f"3. train `debug` on {RANKS} CPU ranks, ZeRO-2; preempted by SIGUSR1 at step {PREEMPT_AT}")
    rc = run(train_cmd, log=logs / "train_1.log", allow=(0, EXIT_REQUEUE),
             on_start=preempt_when_halfway(run_dir))
    latest = (run_dir / LATEST).read_text().strip()
    extra: list[str] = []
    if rc == 0:  # the machine was fast enough to finish before the signal: continue to more steps instead
        extra = ["--set", "train.max_steps=400"]
        print("  [demo] finished before the preemption; the next command continues to step 400")
    elif f"exit {EXIT_REQUEUE} (requeue)" not in (logs / "train_1.log").read_text():
        raise SystemExit(f"demo: training failed (exit {rc}); see {logs / 'train_1.log'}")
    else:
        print(f"  [demo] checkpoint committed: {run_dir / latest}; the launcher exited {EXIT_REQUEUE} (requeue)")
    banner("4. the same command again: resumes from `latest` and finishes")
    run(train_cmd + extra, log=logs / "train_2.log")
    banner("5. generate from the final checkpoint (KV cache, top-k sampling)")
    run([py, "-m", "pretrain", "generate", "--checkpoint", str(run_dir), "--prompt", "Once upon a time",
         "--max-new-tokens", "60", "--temperature", "0.7", "--top-k", "20"], log=logs / "generate.log")

    recs = [json.loads(line) for line in (run_dir / METRICS_FILE).read_text().splitlines()]
    steps = [r["step"] for r in recs]
    assert steps == sorted(set(steps)), "metrics.jsonl must hold every step once"
    first, last = recs[0]["loss"], recs[-1]["loss"]
    vals = [r["val_loss"] for r in recs if r.get("val_loss") is not None]
    db = (run_dir / MLFLOW_DIR / MLFLOW_DB).resolve()
    banner("done")
    print(f"  loss {first:.3f} (step 1) -> {last:.3f} (step {steps[-1]})"
          + (f"; validation loss {vals[0]:.3f} -> {vals[-1]:.3f}" if vals else ""))
    print(f"  wall time {time.time() - t0:.0f} s")
    print(f"  checkpoints: {run_dir.resolve()} (latest: {(run_dir / LATEST).read_text().strip()})")
    print(f"  metrics:     {(run_dir / METRICS_FILE).resolve()}")
    print(f"  MLflow:      sqlite:///{db}   ->  mlflow ui --backend-store-uri sqlite:///{db}")
    print(f"  logs:        {logs.resolve()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
