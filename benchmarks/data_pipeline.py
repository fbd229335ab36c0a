"""Data pipeline throughput: prepare vs the raw tokenizer, and the training loader.

    python benchmarks/data_pipeline.py [--mb 16] [--vocab 8192] [--workers N] [--loader-passes 5] [--json]

1. Builds a corpus of --mb MB of JSONL (documents of ~2-3 KB made from the sample corpus stories) in a
   temp dir and trains a byte-level BPE on part of it.
2. raw: `Tokenizer.encode_batch` on the same texts, already in memory, with the tokenizer's own thread pool
   over all cores -- the ceiling for tokenization on this machine.
3. prepare: the whole `pretrain-data prepare` job (read + parse JSONL, encode in --workers processes, .npy,
   tar, sha256, manifest) on the same texts and the same cores. prepare/raw is the pipeline's overhead.
4. loader: TokenLoader reading those shards back (seq_len 2048, batch 8, shuffle buffer 1000) in ONE process
   (num_workers=0): tokens/s delivered per process, best and median of --loader-passes passes over the data
   (one pass is ~0.2 s: on a shared machine a single pass is mostly noise). The loader checks each shard's
   sha256 as it streams; `sha256 share` is what that hashing alone takes (hashlib over the same shard bytes,
   best of 3) as a share of the best pass: the check's own cost, measured within one build.
Each figure is printed with the command that produced it; --json also writes
benchmarks/results/data_pipeline_cpu.json with machine, date and git commit.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import random
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_pipeline import sample_corpus  # noqa: E402
from data_pipeline.loader import TokenLoader  # noqa: E402
from data_pipeline.prepare import prepare  # noqa: E402
from data_pipeline.tokenizer import load_tokenizer, train_bpe  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def make_corpus(path: Path, megabytes: float, seed: int = 0) -> list[str]:
    stories = [json.loads(line)["text"] for line in open(sample_corpus.path(), encoding="utf-8")]
    rng = random.Random(seed)
    docs, size = [], 0
    while size < megabytes * 1e6:
        doc = "\n\n".join(rng.sample(stories, rng.randint(3, 7)))
        docs.append(doc)
        size += len(doc)
    with open(path, "w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps({"text": d}) + "\n")
    return docs


def raw_encode(tok_dir: str, texts: list[str], batch: int = 512) -> tuple[float, int]:
    """tokens/s of the bare Rust batch encoder (its thread pool on all cores), texts already in memory."""
    os.environ["TOKENIZERS_PARALLELISM"] = "true"
    tok = load_tokenizer(tok_dir)
    tok.encode_batch(texts[:batch])  # warm up the thread pool
    start = time.perf_counter()
    n = 0
    for i in range(0, len(texts), batch):
        n += sum(len(ids) + 1 for ids in tok.encode_batch(texts[i:i + batch]))  # + eos, as prepare counts
    return n / (time.perf_counter() - start), n


def loader_throughput(shards: str, passes: int, seq_len: int = 2048,
                      batch_size: int = 8) -> tuple[list[float], int]:
    """Seconds of each of `passes` full passes over the shards, and the tokens one pass delivers."""
    seconds, n = [], 0
    for _ in range(passes):
        loader = TokenLoader(shards, seq_len=seq_len, batch_size=batch_size, num_workers=0, seed=0,
                             shuffle_buffer=1000, epochs=1)
        start = time.perf_counter()
        n = sum(b["tokens"].numel() for b in loader)
        seconds.append(time.perf_counter() - start)
    return seconds, n


def sha256_seconds(shards: str) -> float:
    """Best of 3: seconds hashlib's sha256 takes over every shard's bytes, in the 1 MiB chunks the loader uses
    (files already in the page cache, as in the loader passes)."""
    files = sorted(Path(shards).glob("*.tar"))
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for path in files:
            h = hashlib.sha256()
            with open(path, "rb", buffering=0) as f:
                while chunk := f.read(1 << 20):
                    h.update(chunk)
        best = min(best, time.perf_counter() - start)
    return best


def cpu_seconds() -> float:
    """CPU time of this process (all its threads) plus its reaped children (prepare's workers)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                              text=True).stdout.strip()
    except OSError:
        return "?"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=float, default=16.0, help="corpus size in MB of text (default 16)")
    ap.add_argument("--vocab", type=int, default=8192, help="BPE vocabulary size (default 8192)")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                    help="prepare worker processes (default: one per core, the raw encoder's core count)")
    ap.add_argument("--loader-passes", type=int, default=5,
                    help="loader passes over the shards; best and median are reported (default 5)")
    ap.add_argument("--json", action="store_true", help="write benchmarks/results/data_pipeline_cpu.json")
    args = ap.parse_args()
    command = "python benchmarks/data_pipeline.py " + shlex.join(sys.argv[1:])
    cores = os.cpu_count()
    with tempfile.TemporaryDirectory(prefix="dp-bench-") as tmp:
        corpus = Path(tmp) / "corpus.jsonl"
        texts = make_corpus(corpus, args.mb)
        tok_dir = str(Path(tmp) / "tok")
        train_bpe(iter(texts[: max(200, len(texts) // 8)]), args.vocab, tok_dir, show_progress=False)

        c0 = cpu_seconds()
        raw_tps, raw_tokens = raw_encode(tok_dir, texts)
        c1 = cpu_seconds()
        result = prepare([str(corpus)], tok_dir, str(Path(tmp) / "shards"), workers=args.workers,
                         shard_size_mb=64, progress=False, command=["benchmark"])
        c2 = cpu_seconds()
        prep_tps = result.tokens_per_s
        assert result.manifest.total_tokens == raw_tokens, "prepare and raw encoder disagree on the token count"
        passes = max(args.loader_passes, 1)
        load_seconds, load_tokens = loader_throughput(str(Path(tmp) / "shards"), passes)
        c3 = cpu_seconds()
        hash_s = sha256_seconds(str(Path(tmp) / "shards"))
        shard_bytes = sum(s.bytes for s in result.manifest.shards)
    load_tps = load_tokens / min(load_seconds)
    load_median = load_tokens / statistics.median(load_seconds)
    hash_share = hash_s / min(load_seconds)
    # CPU-seconds are what a busy shared machine cannot distort: tokens per CPU-second of each job
    raw_cpu, prep_cpu, load_cpu = (raw_tokens / (c1 - c0), raw_tokens / (c2 - c1),
                                   passes * load_tokens / (c3 - c2))

    mb = sum(len(t) for t in texts) / 1e6
    rows = [
        ("raw encode_batch", raw_tps, f"{cores} Rust threads, texts in memory"),
        ("prepare", prep_tps, f"{args.workers} workers, JSONL -> shards, wall clock"),
        ("loader", load_tps, f"1 process, seq 2048 x batch 8, shuffle 1000, best of {passes} passes"),
    ]
    print(f"# {command}")
    print(f"# corpus {mb:.1f} MB, {len(texts):,} docs, {raw_tokens:,} tokens, vocab {args.vocab}, {cores} cores")
    for name, tps, how in rows:
        print(f"{name:18s} {tps / 1e6:8.3f} M tokens/s   ({how})")
    ratio = prep_tps / raw_tps
    print(f"prepare / raw      {ratio:8.2f} x       (target >= 0.8 at equal cores)")
    print(f"loader             {load_tps / 1e6:8.2f} M tokens/s per process (target >= 5; median of {passes} "
          f"passes {load_median / 1e6:.2f} M)")
    print(f"sha256 share       {hash_share * 100:8.2f} %        (of the best loader pass: hashing the "
          f"{shard_bytes / 1e6:.1f} MB of shards it checks as they stream takes {hash_s * 1e3:.1f} ms)")
    print(f"per CPU-second:    raw {raw_cpu / 1e6:.3f} M, prepare {prep_cpu / 1e6:.3f} M (ratio {prep_cpu / raw_cpu:.2f}),"
          f" loader {load_cpu / 1e6:.2f} M tokens   (load average {os.getloadavg()[0]:.1f})")
    if args.json:
        out = REPO / "benchmarks" / "results" / "data_pipeline_cpu.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        body = {
            "command": command, "device": f"cpu ({platform.processor() or platform.machine()}, {cores} cores)",
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "commit": git_commit(),
            "corpus_mb": round(mb, 2), "docs": len(texts), "tokens": raw_tokens, "vocab": args.vocab,
            "raw_encode_tokens_per_s": round(raw_tps), "prepare_tokens_per_s": round(prep_tps),
            "prepare_workers": args.workers, "prepare_over_raw": round(ratio, 3),
            "loader_tokens_per_s_per_process": round(load_tps), "loader_tokens": load_tokens,
            "loader_passes": passes, "loader_tokens_per_s_median": round(load_median),
            "loader_shard_bytes": shard_bytes, "loader_sha256_s": round(hash_s, 4),
            "loader_sha256_share": round(hash_share, 4),
            "raw_tokens_per_cpu_s": round(raw_cpu), "prepare_tokens_per_cpu_s": round(prep_cpu),
            "loader_tokens_per_cpu_s": round(load_cpu), "load_average": round(os.getloadavg()[0], 2),
        }
        tmp_out = out.with_suffix(".json.tmp")
        tmp_out.write_text(json.dumps(body, indent=1) + "\n")
        os.replace(tmp_out, out)
        print(f"wrote {out.relative_to(REPO)}")


if __name__ == "__main__":
    main()
