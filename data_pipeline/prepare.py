"""`pretrain-data prepare`: raw corpus files -> tokenized webdataset shards + manifest.json.

Pipeline: the main process reads documents (sources.py) and cuts them into batches; K worker processes each
run the tokenizer's Rust/C++ batch encoder on a batch and serialise each document's ids (+ eos) as .npy; the
main process writes the results IN INPUT ORDER into shards. Output is therefore byte-identical whatever K is.
At most 2*K batches are in flight, so memory stays bounded on any corpus size (Pool.imap or Executor.map
would read the whole input ahead).

`workers=0` encodes in the main process with the tokenizer's own thread pool instead (no IPC, but reading and
writing then do not overlap with encoding).

Workers are never forked from the calling process: `prepare` also runs in-process inside long-lived
multi-threaded programs (pyarrow's thread pools, a pytest-xdist worker, coverage.py), and a child forked from
one can inherit a lock that another thread held and wait on it forever. On Linux they come from a fork server
(a fresh, single-threaded interpreter started once per process, which imports what workers need once, so a
pool still starts in milliseconds); elsewhere they are spawned. So the worker functions below live at module
level and take only picklable arguments, and they are stopped by a sentinel, not a signal.
"""
from __future__ import annotations

import collections
import glob
import multiprocessing as mp
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Iterator

import numpy as np

from data_pipeline.errors import DataError
from data_pipeline.manifest import MANIFEST_NAME, Manifest, TokenizerInfo, write_manifest
from data_pipeline.shard_writer import TEMP_SUFFIX, ShardSetWriter, npy_bytes
from data_pipeline.sources import SkipCounter, expand_inputs, iter_documents
from data_pipeline.tokenizer import load_tokenizer, token_dtype

BATCH_DOCS = 512            # documents per encode task
BATCH_CHARS = 1 << 20       # ... or this many characters, whichever comes first
# Imported once by the fork server, so each worker forked from it starts with them loaded (this module pulls in
# numpy and, through shard_writer -> webdataset, torch: over a second per worker otherwise). The server skips a
# module that fails to import. As with "spawn", a script that calls prepare() with workers > 0 needs an
# `if __name__ == "__main__":` guard: each worker runs the main script's top level (as __mp_main__).
_FORKSERVER_PRELOAD = ["data_pipeline.prepare", "data_pipeline.tokenizer", "tokenizers", "sentencepiece"]


@dataclass(frozen=True)
class PrepareResult:
    manifest: Manifest
    out_dir: str
    seconds: float
    skipped: SkipCounter | None

    @property
    def tokens_per_s(self) -> float:
        return self.manifest.total_tokens / max(self.seconds, 1e-9)


# ---- worker side -------------------------------------------------------------------------------------------
_TOKENIZER = None
_DTYPE: np.dtype | None = None


def _worker_init(tokenizer_path: str, single_threaded: bool = True) -> None:
    global _TOKENIZER, _DTYPE
    if single_threaded:
        os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one process = one core; K processes use K cores
    _TOKENIZER = load_tokenizer(tokenizer_path)
    _DTYPE = token_dtype(_TOKENIZER.vocab_size)


def _encode(texts: list[str]) -> tuple[list[bytes], list[int]]:
    """One batch -> (.npy bytes per document, token count per document). eos closes every document."""
    eos = _TOKENIZER.eos_id
    blobs, counts = [], []
    for ids in _TOKENIZER.encode_batch(texts):
        arr = np.empty(len(ids) + 1, dtype=_DTYPE)
        arr[:-1] = ids
        arr[-1] = eos
        blobs.append(npy_bytes(arr))
        counts.append(len(arr))
    return blobs, counts


# ---- main side ---------------------------------------------------------------------------------------------
def _pool_context() -> mp.context.BaseContext:
    """forkserver on Linux, spawn elsewhere: never fork() this (possibly multi-threaded) process."""
    if sys.platform != "linux":
        return mp.get_context("spawn")
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(_FORKSERVER_PRELOAD)  # takes effect when this process first starts its server
    return ctx


def _batches(docs) -> Iterator[tuple[list[str], list[str]]]:
    ids: list[str] = []
    texts: list[str] = []
    chars = 0
    for doc in docs:
        ids.append(doc.source_id)
        texts.append(doc.text)
        chars += len(doc.text)
        if len(texts) >= BATCH_DOCS or chars >= BATCH_CHARS:
            yield ids, texts
            ids, texts, chars = [], [], 0
    if texts:
        yield ids, texts


def _encoded_in_order(batches, tokenizer_path: str, workers: int):
    """Yield (source_ids, blobs, counts) per batch, in input order, with bounded look-ahead."""
    if workers == 0:
        _worker_init(tokenizer_path, single_threaded=False)  # the Rust thread pool uses every core
        for ids, texts in batches:
            yield (ids, *_encode(texts))
        return
    # Not multiprocessing.Pool: its exit (terminate()) SIGTERMs the workers and then waits for each to die, and a
    # worker that runs a Python-level SIGTERM handler it was started with (coverage.py's `sigterm = true` is one)
    # can survive that and hang the caller forever. The executor stops its workers with a sentinel (it signals
    # them only once the pool is already broken: a worker died, or the initializer failed, which raises here
    # instead of respawning workers forever as Pool does).
    with ProcessPoolExecutor(workers, mp_context=_pool_context(), initializer=_worker_init,
                             initargs=(tokenizer_path,)) as pool:
        pending: collections.deque = collections.deque()
        try:
            for ids, texts in batches:
                pending.append((ids, pool.submit(_encode, texts)))
                if len(pending) >= 2 * workers:
                    ids0, fut = pending.popleft()
                    yield (ids0, *fut.result())
            while pending:
                ids0, fut = pending.popleft()
                yield (ids0, *fut.result())
        except BaseException:  # a bad input, a failed write, Ctrl-C, the consumer gone: drop the queued batches
            pool.shutdown(wait=True, cancel_futures=True)
            raise


def usable_cores() -> int:
    """Cores this process may run on (a SLURM/cgroup allocation, not the whole node)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _prepare_out_dir(out_dir: str, overwrite: bool) -> None:
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:
        raise DataError(f"{out_dir}: cannot create the output directory ({e.strerror})") from None
    existing = os.listdir(out_dir)
    if not existing:
        return
    if not overwrite:
        raise DataError(f"{out_dir}: directory is not empty ({len(existing)} entries, e.g. {sorted(existing)[0]}); "
                        "pass --overwrite to replace its shards")
    # The manifest goes first: if this is interrupted, no manifest ever lists a shard that is gone.
    ours = [os.path.join(out_dir, MANIFEST_NAME)] if MANIFEST_NAME in existing else []
    ours += glob.glob(os.path.join(out_dir, "shard-*.tar")) + glob.glob(os.path.join(out_dir, "*" + TEMP_SUFFIX))
    for path in ours:  # other files (not ours) are left alone
        os.remove(path)


def prepare(inputs: list[str], tokenizer: str, out_dir: str, *, text_key: str = "text",
            shard_size_mb: float = 256.0, workers: int | None = None, overwrite: bool = False,
            skip_bad: bool = False, progress: bool = True, command: list[str] | None = None) -> PrepareResult:
    """Tokenize `inputs` (paths/globs/dirs) with `tokenizer` into shards under `out_dir`; write manifest.json."""
    start = time.perf_counter()
    files = expand_inputs(inputs)
    tok = load_tokenizer(tokenizer)
    dtype = token_dtype(tok.vocab_size)
    _prepare_out_dir(out_dir, overwrite)
    workers = usable_cores() if workers is None else workers
    skip = SkipCounter() if skip_bad else None
    writer = ShardSetWriter(out_dir, max_bytes=max(1, int(shard_size_mb * 1e6)))
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(unit=" docs", desc=f"prepare -> {out_dir}", file=sys.stderr, smoothing=0.1)
    n_docs = n_tokens = 0
    try:
        batches = _batches(iter_documents(files, text_key, skip))
        for ids, blobs, counts in _encoded_in_order(batches, tokenizer, workers):
            for source_id, blob, count in zip(ids, blobs, counts):
                writer.write(f"{n_docs:012d}", blob, count, source_id)
                n_docs += 1
                n_tokens += count
            if bar is not None:
                bar.update(len(ids))
                bar.set_postfix_str(f"{n_tokens / max(time.perf_counter() - start, 1e-9):,.0f} tokens/s",
                                    refresh=False)
        shards = writer.close()
    except BaseException:
        writer.abort()
        raise
    finally:
        if bar is not None:
            bar.close()
    if n_docs == 0:
        raise DataError(f"{', '.join(inputs)}: no documents to write"
                        + (f" ({skip.summary()})" if skip and skip.total else ""))
    manifest = Manifest(
        tokenizer=TokenizerInfo(identity=tok.identity, kind=tok.kind, vocab_size=tok.vocab_size,
                                eos_id=tok.eos_id, bos_id=tok.bos_id, pad_id=tok.pad_id,
                                path=os.path.abspath(tokenizer)),  # training runs from anywhere
        dtype=dtype.name, shards=tuple(shards), command=tuple(command if command is not None else sys.argv),
        skipped=dict(skip.counts) if skip else {}, created=datetime.now(timezone.utc).isoformat(timespec="seconds"))
    write_manifest(out_dir, manifest)
    return PrepareResult(manifest=manifest, out_dir=out_dir, seconds=time.perf_counter() - start, skipped=skip)
