"""Requests per second of `pretrain eval` (lm-eval model "pretrain") vs lm-eval's own `hf` backend on the exported
model: the same request list, the same batch size, the same torch thread count, CPU, the debug flavor's shape.

    python benchmarks/eval_speed.py [--batch-size 8] [--docs 200] [--out benchmarks/results/eval_speed_cpu.json]

In a scratch directory (a new temp dir unless --work): a 1024-token BPE tokenizer and shards from the sample
corpus (`pretrain-data`), a few steps of `pretrain train --config configs/debug.yaml` on CPU (the debug flavor's
real shape: dim 64, 4 layers, 512-token context; only the run is short), `pretrain export-hf --dtype fp32`, and a
local lm-eval multiple-choice task of --docs documents (context 100-300 tokens, 4 choices of a few words, from
the sample corpus's stories). The request list is built once with lm-eval's own API (TaskManager,
get_task_dict, build_all_requests) and pickled; each backend then loads in a child process of its own (one model
in memory, torch threads set before anything runs), warms up with one call on the first 2 x batch requests and
times `lm.loglikelihood(instances)` on the whole list whenever told to; the two take turns, one at a time, for
--repeats rounds (the order swapped every round), so that a busy moment of a shared machine hits both alike:
  pretrain  open_session(RUN, dtype="fp32") -> PretrainLM.create_from_arg_obj({"checkpoint": RUN}, {"batch_size": B})
  hf        lm_eval.models.huggingface.HFLM(pretrained=HF, batch_size=B, dtype="float32", device="cpu",
            prefix_token_id=<the tokenizer's eos id>, the token `pretrain` puts before every context)
Both use --threads torch threads (default 1; see its help). The headline is the median of the repeats (the best
is stored too). Both answers are compared request by request:
the largest |difference| of the log-likelihoods and the number of differing greedy flags.
"""
from __future__ import annotations

import argparse
import json
import os
import pickle
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
TASK = "eval_speed_mc"
TRAIN_STEPS = 10


def _run(cmd: list[str], env: dict[str, str] | None = None) -> str:
    """`cmd` from the repo root, quietly; its stdout, or exit with the tail of its stderr."""
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return proc.stdout


def _dirty() -> list[str]:
    """Tracked files that differ from the commit recorded (the code measured is the commit plus these)."""
    try:
        out = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO, capture_output=True,
                             text=True).stdout
    except OSError:
        return []
    return [line[3:] for line in out.splitlines() if line.strip()]


def _shown(cmd: list[str]) -> str:
    return " ".join(["python", *cmd[1:]]) if cmd[0] == sys.executable else " ".join(cmd)


# ------------------------------------------------------------------------------------------- the model

def make_model(work: Path, steps: int) -> tuple[Path, Path, list[str]]:
    """Tokenizer + shards + a short debug-flavor run + its fp32 export; (run dir, HF dir, the commands)."""
    from data_pipeline import sample_corpus

    py = sys.executable
    tok, shards, run, hf = work / "tok", work / "shards", work / "run", work / "hf"
    cmds = [
        [py, "-m", "data_pipeline", "train-tokenizer", "--input", sample_corpus.path(), "--vocab-size", "1024",
         "--out", str(tok)],
        [py, "-m", "data_pipeline", "prepare", "--input", sample_corpus.path(), "--tokenizer", str(tok),
         "--out", str(shards), "--workers", "0", "--no-progress"],
        [py, "-m", "pretrain", "train", "--config", "configs/debug.yaml", *(a for s in (
            f"data.path={shards}", "data.val_path=null", f"checkpoint.dir={run}", "checkpoint.every=0",
            "tracking.enabled=false", "train.device=cpu", f"train.max_steps={steps}", "train.eval_every=0",
            "train.log_every=5", "data.num_workers=0") for a in ("--set", s))],
        [py, "-m", "pretrain", "export-hf", "--checkpoint", str(run), "--out", str(hf), "--dtype", "fp32"],
    ]
    for cmd in cmds:
        t = time.perf_counter()
        _run(cmd)
        print(f"  {time.perf_counter() - t:5.1f} s  {_shown(cmd)}", flush=True)
    return run, hf, [_shown(c) for c in cmds]


# -------------------------------------------------------------------------------------------- the task

def make_task(work: Path, docs: int, tokenizer_dir: Path, seed: int = 0) -> tuple[Path, dict[str, Any]]:
    """A local multiple-choice task: `docs` documents, contexts of 100-300 tokens (our tokenizer) cut from the
    sample corpus's stories, 4 choices of 2-6 words each (words of other stories). The directory is returned with
    the documents' token-length statistics."""
    from data_pipeline import sample_corpus
    from data_pipeline.tokenizer import load_tokenizer

    tok = load_tokenizer(str(tokenizer_dir))
    stories = [json.loads(line)["text"] for line in Path(sample_corpus.path()).read_text().splitlines() if line]
    rng = random.Random(seed)
    rows, ctx_lens, choice_lens = [], [], []
    for i in range(docs):
        want = rng.randint(100, 300)
        words: list[str] = []
        while len(tok.encode_batch([" ".join(words)])[0]) < want:
            words += rng.choice(stories).split()
        while len(words) > 1 and len(tok.encode_batch([" ".join(words)])[0]) > want:
            words.pop()
        choices = []
        for _ in range(4):
            pool = rng.choice(stories).split()
            n = rng.randint(2, 6)
            start = rng.randrange(0, max(1, len(pool) - n))
            choices.append(" ".join(pool[start:start + n]))
        rows.append({"id": i, "context": " ".join(words), "choices": choices, "label": rng.randrange(4)})
        ctx_lens.append(len(tok.encode_batch([rows[-1]["context"]])[0]))
        choice_lens += [len(x) for x in tok.encode_batch([" " + c for c in choices])]
    task_dir = work / "tasks"
    task_dir.mkdir(parents=True, exist_ok=True)
    data = task_dir / "docs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (task_dir / f"{TASK}.yaml").write_text(
        f"task: {TASK}\n"
        "dataset_path: json\n"
        "dataset_kwargs:\n"
        "  data_files:\n"
        f"    test: {data}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        "doc_to_text: \"{{context}}\"\n"
        "doc_to_choice: choices\n"
        "doc_to_target: label\n"
        "target_delimiter: \" \"\n"
        "metric_list:\n"
        "  - metric: acc\n")
    stats = {"docs": docs, "choices_per_doc": 4,
             "context_tokens": {"min": min(ctx_lens), "median": statistics.median(ctx_lens), "max": max(ctx_lens)},
             "choice_tokens": {"min": min(choice_lens), "median": statistics.median(choice_lens),
                               "max": max(choice_lens)}}
    return task_dir, stats


def build_requests(task_dir: Path, out: Path) -> int:
    """lm-eval's own request building, once; the instances pickled to `out`. Returns how many."""
    from lm_eval.tasks import TaskManager, get_task_dict

    manager = TaskManager(include_path=str(task_dir), include_defaults=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # get_task_dict: still the documented way in 0.4
        task = get_task_dict([TASK], manager)[TASK]
    task.build_all_requests(rank=0, world_size=1)
    instances = list(task.instances)
    out.write_bytes(pickle.dumps(instances))
    return len(instances)


# ------------------------------------------------------------------------------------------ one backend

_MARK = "EVAL_SPEED "  # this protocol's lines on a child's stdout (libraries print there too)


def worker(args: argparse.Namespace) -> int:
    """One backend in this process: load it, warm it up, then one timed pass over the whole list per "time" line
    on stdin; "done" writes the last pass's answers to --result."""
    import torch

    torch.set_num_threads(args.threads)
    instances = pickle.loads(Path(args.requests).read_bytes())
    t = time.perf_counter()
    if args.worker == "pretrain":
        from pretrain.eval.lm import PretrainLM
        from pretrain.eval.session import open_session

        open_session(args.run, dtype="fp32", device="cpu")
        lm = PretrainLM.create_from_arg_obj({"checkpoint": args.run}, {"batch_size": args.batch_size})
    else:
        from lm_eval.models.huggingface import HFLM
        from transformers import AutoTokenizer

        eos = AutoTokenizer.from_pretrained(args.hf).eos_token_id
        lm = HFLM(pretrained=args.hf, batch_size=args.batch_size, dtype="float32", device="cpu",
                  prefix_token_id=eos)
    load_s = time.perf_counter() - t
    lm.loglikelihood(instances[:2 * args.batch_size], disable_tqdm=True)
    print(_MARK + json.dumps({"load_s": load_s, "torch_threads": torch.get_num_threads()}), flush=True)
    answers: list[Any] = []
    for line in sys.stdin:
        if line.strip() == "done":
            break
        t, cpu = time.perf_counter(), time.process_time()
        answers = lm.loglikelihood(instances, disable_tqdm=True)
        seconds, cpu_s = time.perf_counter() - t, time.process_time() - cpu
        print(_MARK + json.dumps({"seconds": seconds, "cpu_s": cpu_s}), flush=True)
    Path(args.result).write_text(json.dumps([[float(ll), bool(g)] for ll, g in answers]))
    return 0


class Backend:
    """A worker child process, loaded and warmed up, that times one pass whenever asked."""

    def __init__(self, name: str, args: argparse.Namespace, run: Path, hf: Path, requests: Path) -> None:
        self.name, self.result, self.log = name, args.work / f"answers_{name}.json", args.work / f"{name}.log"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", name, "--run", str(run), "--hf", str(hf),
               "--requests", str(requests), "--batch-size", str(args.batch_size), "--threads", str(args.threads),
               "--result", str(self.result)]
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
               "TOKENIZERS_PARALLELISM": "false", "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
               "TRANSFORMERS_OFFLINE": "1", "DS_ACCELERATOR": "cpu"}
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, text=True, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self.log.open("w"))
        self.ready = self._read()
        self.seconds: list[float] = []
        self.cpu_s: list[float] = []

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith(_MARK):
                return json.loads(line[len(_MARK):])
        sys.exit(f"the {self.name} worker exited {self.proc.wait()}:\n{self.log.read_text()[-3000:]}")

    def _say(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def time_one_pass(self) -> float:
        self._say("time")
        out = self._read()
        self.seconds.append(out["seconds"])
        self.cpu_s.append(out["cpu_s"])
        return out["seconds"]

    def answers(self) -> list[list[Any]]:
        self._say("done")
        if self.proc.wait() != 0:
            sys.exit(f"the {self.name} worker exited {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
        return json.loads(self.result.read_text())


# ------------------------------------------------------------------------------------------------ main

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--docs", type=int, default=200, help="multiple-choice documents (4 requests each)")
    ap.add_argument("--repeats", type=int, default=5, help="timed passes over the whole list per backend")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads of both backends (default 1: on a shared 2-core machine, 2 threads are "
                    "oversubscribed by any other load and OpenMP's spin-waiting then swings a pass 3-10x)")
    ap.add_argument("--steps", type=int, default=TRAIN_STEPS, help="training steps of the model")
    ap.add_argument("--work", type=Path, default=None, help="scratch directory (default: a new temp dir, removed)")
    ap.add_argument("--out", type=Path, default=None, help="write the results JSON here")
    for hidden in ("--worker", "--run", "--hf", "--requests", "--result"):
        ap.add_argument(hidden, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    # This file's own directory leads sys.path; its kernels.py would shadow the `kernels` package transformers imports.
    sys.path[:] = [str(REPO)] + [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if args.worker:
        return worker(args)

    from benchmarks.provenance import provenance, report

    started = time.perf_counter()
    keep = args.work is not None
    args.work = (args.work or Path(tempfile.mkdtemp(prefix="eval_speed_"))).resolve()
    args.work.mkdir(parents=True, exist_ok=True)
    try:
        print(f"model (scratch: {args.work}):", flush=True)
        run, hf, made_by = make_model(args.work, args.steps)
        task_dir, task_stats = make_task(args.work, args.docs, args.work / "tok")
        requests = args.work / "requests.pkl"
        n = build_requests(task_dir, requests)
        print(f"task: {args.docs} docs -> {n} loglikelihood requests; context tokens "
              f"{task_stats['context_tokens']}, choice tokens {task_stats['choice_tokens']}", flush=True)
        load_before = os.getloadavg()
        backends = {name: Backend(name, args, run, hf, requests) for name in ("pretrain", "hf")}
        for r in range(args.repeats):  # interleaved, the order alternating: a busy moment of the machine hits both
            for b in (backends.values() if r % 2 == 0 else reversed(backends.values())):
                print(f"  round {r + 1}: {b.name:8s} {b.time_one_pass():.3f} s", flush=True)
        answers = {name: b.answers() for name, b in backends.items()}
        load_after = os.getloadavg()
    finally:
        if not keep:
            shutil.rmtree(args.work, ignore_errors=True)

    ours, theirs = answers["pretrain"], answers["hf"]
    max_abs = max(abs(a[0] - b[0]) for a, b in zip(ours, theirs))
    greedy_diff = sum(a[1] != b[1] for a, b in zip(ours, theirs))
    rows = {}
    for name, b in backends.items():
        med = statistics.median(b.seconds)
        rows[name] = {"requests": n, "seconds_median": round(med, 3), "seconds_best": round(min(b.seconds), 3),
                      "seconds_all": [round(s, 3) for s in b.seconds], "cpu_s_all": [round(s, 3) for s in b.cpu_s],
                      "requests_per_s": round(n / med, 1), "requests_per_s_best": round(n / min(b.seconds), 1),
                      "load_s": round(b.ready["load_s"], 2), "torch_threads": b.ready["torch_threads"]}
    ratio = rows["pretrain"]["requests_per_s"] / rows["hf"]["requests_per_s"]
    ratio_best = rows["hf"]["seconds_best"] / rows["pretrain"]["seconds_best"]
    cores = len(os.sched_getaffinity(0))
    device = f"cpu ({platform.processor() or platform.machine()}, {cores} cores)"
    config = {"flavor": "debug", "config": "configs/debug.yaml", "train_steps": args.steps, "tokenizer_vocab": 1024,
              "batch_size": args.batch_size, "docs": args.docs, "repeats": args.repeats,
              "torch_threads": args.threads, "dtype": "fp32", "task": task_stats, "model_made_by": made_by}
    from importlib.metadata import version

    result = {**provenance("eval_speed", device, config),
              "versions": {p: version(p) for p in ("torch", "transformers", "lm_eval", "deepspeed")},
              "backends": rows, "ours_over_hf": round(ratio, 3), "ours_over_hf_best": round(ratio_best, 3),
              "load_average_1min": {"before": round(load_before[0], 2), "after": round(load_after[0], 2)},
              "agreement": {"max_abs_loglikelihood_diff": max_abs, "greedy_flags_differing": greedy_diff,
                            "requests": n},
              "uncommitted_changes": _dirty(), "wall_s": round(time.perf_counter() - started, 1),
              "notes": "seconds: lm.loglikelihood(all requests), each backend in a process of its own, after one "
                       f"warm-up call on {2 * args.batch_size} requests; the two alternate pass by pass (order "
                       "swapped every round), only one running at a time; requests_per_s from the median of the "
                       "repeats, cpu_s: the process's CPU time of each pass. "
                       "load_s: building the model (pretrain: open_session + create_from_arg_obj; hf: HFLM()). "
                       "Tokenization of the requests is inside the timed call for both."}
    print(f"\n{'backend':10s} {'requests':>8s} {'seconds':>8s} {'req/s':>8s}  (median of {args.repeats}; "
          f"batch {args.batch_size}, {args.threads} torch threads, fp32, CPU)")
    for name, r in rows.items():
        print(f"{name:10s} {n:8d} {r['seconds_median']:8.3f} {r['requests_per_s']:8.1f}  "
              f"(all: {', '.join(f'{s:.3f}' for s in r['seconds_all'])} s; load {r['load_s']:.1f} s)")
    print(f"ours/hf requests/s: {ratio:.2f}x (medians), {ratio_best:.2f}x (bests); 1-min load average "
          f"{load_before[0]:.1f} before, {load_after[0]:.1f} after")
    print(f"agreement: max |log-likelihood difference| {max_abs:.3g} over {n} requests; "
          f"greedy flags differing: {greedy_diff}")
    report(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
