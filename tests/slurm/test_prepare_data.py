"""slurm/prepare_data.sbatch as a 2-task array job + its dependent merge, against one plain `prepare` run."""
from __future__ import annotations

import json
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest

from data_pipeline.manifest import read_manifest
from data_pipeline.shard_reader import decode_tokens, iter_raw_samples
from slurm_helpers import REPO, Cluster, child_env, sbatch, wait_job

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

SCRIPT = REPO / "slurm" / "prepare_data.sbatch"
WORDS = "river stone winter light market garden bridge letter village summer water story".split()


def _cli(*args: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "data_pipeline", *args], cwd=REPO, env=child_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"pretrain-data {args[0]} failed:\n{proc.stdout}\n{proc.stderr}"


def _documents(shards: Path) -> list[tuple[int, ...]]:
    """Every document's token ids, sorted: the content of a shard set, whatever its shard boundaries."""
    manifest = read_manifest(str(shards))
    docs = []
    for shard in manifest.shards:
        for key, parts in iter_raw_samples(str(shards / shard.name)):
            docs.append(tuple(decode_tokens(parts.get("tokens.npy"), key).tolist()))
    assert len(docs) == manifest.total_samples
    return sorted(docs)


def test_array_job_shards_hold_the_same_documents_as_one_prepare(slurm_cluster: Cluster, tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    rng = random.Random(0)
    for f in range(5):  # 5 files over 2 tasks: task 0 gets 3, task 1 gets 2
        with (corpus / f"part{f}.jsonl").open("w") as out:
            for d in range(40):
                out.write(json.dumps({"text": f"file {f} doc {d}: " + " ".join(rng.choices(WORDS, k=30))}) + "\n")
    _cli("train-tokenizer", "--input", str(corpus), "--vocab-size", "300", "--out", str(tmp_path / "tok"))
    options = ["--tokenizer", str(tmp_path / "tok"), "--shard-size-mb", "0.01", "--workers", "0"]
    _cli("prepare", "--input", str(corpus), "--out", str(tmp_path / "single"), "--no-progress", *options)

    out = tmp_path / "shards"
    array = sbatch(slurm_cluster, ["--array=0-1", "--cpus-per-task=1", f"--output={tmp_path}/%x-%A_%a.out",
                                   str(SCRIPT), "--input", f"{corpus}/*.jsonl", "--out", str(out), *options],
                   slurm_cluster.env())
    marker = out / "parts" / ".merge-submitted"
    deadline = time.monotonic() + 120
    while not (marker.exists() and marker.read_text().strip()):
        assert time.monotonic() < deadline, f"array {array}: task 0 never queued the merge job"
        time.sleep(0.2)
    merge = marker.read_text().strip()
    info = wait_job(slurm_cluster, merge, timeout=240)
    merge_log = (out / "parts" / f"merge-{merge}.out").read_text()
    assert info["JobState"] == "COMPLETED", merge_log

    single, merged = read_manifest(str(tmp_path / "single")), read_manifest(str(out))
    assert len({p.name for p in (out / "parts").glob("part-*")}) == 2
    assert (merged.total_samples, merged.total_tokens) == (single.total_samples, single.total_tokens) == (
        200, merged.total_tokens)
    assert merged.tokenizer == single.tokenizer and merged.dtype == single.dtype
    assert _documents(out) == _documents(tmp_path / "single")
    _cli("verify", str(out), "--tokenizer", str(tmp_path / "tok"))  # checksums of the renamed shards hold
