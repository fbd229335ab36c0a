"""A large vocabulary trains in bounded memory on CPU: the output head's loss runs in token chunks, so a 1-rank
debug model with a 131072-token vocabulary and 8192 tokens per micro-batch stays under 2.5 GB of peak RSS. The
whole fp32 logits of one micro-batch alone would be 4 GiB (8192 x 131072 x 4 bytes), their gradient as much."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from spawn import REPO, child_env
from train_common import tiny_shards, train_args

# Runs `pretrain train` in this process and prints its peak resident set (ru_maxrss: KiB on Linux).
RUNNER = """
import resource, sys
from pretrain.cli import main
code = main(sys.argv[1:])
print('PEAK_RSS_KIB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, 'EXIT', code)
"""


@pytest.mark.slow
def test_a_131k_vocabulary_at_8192_tokens_per_micro_batch_peaks_under_2_5_gb(tmp_path_factory):
    data = tiny_shards(tmp_path_factory.mktemp("data"))
    run = tmp_path_factory.mktemp("run") / "run"
    args = train_args(data / "shards", run, "model.dim=64", "model.n_layers=4", "model.n_heads=4",
                      "model.n_kv_heads=2", "model.ffn_hidden_dim=192", "model.vocab_size=131072",
                      "train.seq_len=512", "train.micro_batch_size=16", "train.grad_accum=1", "train.max_steps=2",
                      "data.shuffle_buffer=0", "train.device=cpu")
    p = subprocess.run([sys.executable, "-c", RUNNER, *args[2:]], cwd=REPO, env=child_env(OMP_NUM_THREADS="2"),
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    line = next(x for x in p.stdout.splitlines() if x.startswith("PEAK_RSS_KIB"))
    peak_gb, code = int(line.split()[1]) * 1024 / 1e9, int(line.split()[3])
    print(f"peak RSS {peak_gb:.2f} GB (debug shape, vocab 131072, 16 x 512 tokens per micro-batch)")
    assert code == 0
    steps = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps] == [1, 2]
    assert peak_gb < 2.5, f"peak RSS {peak_gb:.2f} GB"
