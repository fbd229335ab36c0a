"""A run that stops making progress says where every rank is and asks to be requeued, before a collective's timeout
ends it without a word: 2 real ranks, one stalled inside step 3 by a test-only hook (the other then waits for it
in the step's gradient all-reduce)."""
from __future__ import annotations

import json
import time

import pytest
from train_common import launch, losses, tiny_shards, train_args

from pretrain.run.exits import EXIT_HUNG

pytestmark = pytest.mark.slow  # trains on 2 ranks, twice

HANG_S = 4


def test_a_stalled_rank_is_named_every_rank_dumps_its_stacks_and_a_relaunch_resumes(tmp_path):
    data = tiny_shards(tmp_path / "data")
    run = tmp_path / "run"
    args = train_args(data / "shards", run, "train.max_steps=4", "checkpoint.every=1",
                      f"train.hang_timeout_s={HANG_S}", "train.collective_timeout_s=120")
    t0 = time.monotonic()
    p = launch(2, args, PRETRAIN_INJECT_STALL="1:3:200")
    took = time.monotonic() - t0
    assert p.returncode == EXIT_HUNG, p.stderr[-4000:]
    assert took < 60, f"the hang took {took:.0f} s to be reported (timeout {HANG_S} s, the stall 200 s)"

    (dump,) = (run / "hangs").iterdir()
    assert dump.name.endswith("-step_3")
    waiting, stalled = (dump / "rank_00000.txt").read_text(), (dump / "rank_00001.txt").read_text()
    assert "main thread: in " in waiting and "distributed_c10d" in waiting, waiting[:2000]
    assert "main thread: not in a collective: at pretrain/train/faults.py" in stalled, stalled[:2000]
    assert "in before_step" in stalled and 'File "' in stalled  # the Python stacks themselves
    line = next(x for x in p.stderr.splitlines() if "hang at step 3" in x)
    assert "rank 1 is not in a collective (at pretrain/train/faults.py:" in line, line
    assert "rank 0 waits in all_reduce" in line and "from pretrain/train/engine.py:" in line, line
    assert f"exit {EXIT_HUNG}" in line and str(dump) in line
    assert (dump / "summary.txt").read_text().splitlines()[0] in line

    p = launch(2, args)  # the requeued job: resumes from the last checkpoint (step 2) and finishes
    assert p.returncode == 0, p.stderr[-4000:]
    assert "at step 2" in p.stderr
    assert sorted(losses(run)) == [1, 2, 3, 4]
    assert json.loads((run / "summary.json").read_text())["final_step"] == 4
