"""`train.spike` end to end, on 2 DP ranks under the local launcher: a corpus with a planted poisoned stretch
(documents of random letters, which the model trained on plain words finds very surprising) makes the loss
spike; the run rolls back exactly once, to the checkpoint before the spike, and never trains on the poisoned
samples after it. A second run is killed with SIGKILL twice during the episode (inside the spike window, then
right after the rollback was recorded) and resumed each time: it ends in exactly the same state. A stretch far
longer than the spike window is got past with one rollback too (the look-ahead), durably across kills during and
after the look-ahead. With no rollbacks allowed, the same spike stops the run with exit 3 ("needs a person").

Each launch costs seconds of start-up for well under a second of training, so launches are shared where a state is
the same: the run killed inside the spike window (module fixture `episode`) is both the first kill of the resume
sequence and, copied, the 2-rank run a 1-rank relaunch rolls back from (a checkpoint of another layout).
"""
from __future__ import annotations

import json
import random
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from shared import copy_of
from train_common import WORDS, launch as launch_ranks, shards_of, train_args

pytestmark = pytest.mark.slow  # every test trains through a planted loss spike

POISON = re.compile(r"\b[qxzjv]{3,}\b")  # poisoned words use only these letters; no clean word does
STEPS, EVERY = 40, 5
SKIP = 2  # global batches skipped beyond the spike window: the poison's tail, read after the spike is confirmed
CONFIRM = 2  # suspicious steps in a row that confirm a spike
SPIKE = ["train.spike.enabled=true", "train.spike.window=8", f"train.spike.confirm_steps={CONFIRM}",
         f"train.spike.skip_batches={SKIP}"]


def poisoned_shards(root: Path, poison: range = range(40, 42)) -> Path:
    """400 short documents in one shard, read in order (no shuffle): DP rank 0 reads documents 0-199, and
    `poison` are the poisoned ones (by default documents 40-41, read around step 30)."""
    rng = random.Random(0)
    texts = []
    for i in range(400):
        if i in poison:
            texts.append(" ".join("".join(rng.choice("qxzjv") for _ in range(rng.randint(3, 8))) for _ in range(25)))
        else:
            texts.append(" ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 60))) + ".")
    return shards_of(texts, root, shard_size_mb=10)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return poisoned_shards(tmp_path_factory.mktemp("poisoned") / "data")


def launch(shards: Path, run: Path, *extra: str, nproc: int = 2, **env: str) -> subprocess.CompletedProcess:
    args = train_args(shards, run, f"train.max_steps={STEPS}", f"checkpoint.every={EVERY}", "checkpoint.keep=10",
                      "data.shuffle_buffer=0", "optim.lr=3e-3", "train.log_every=100", *SPIKE, *extra)
    return launch_ranks(nproc, args, **env)


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def replay(shards: Path, state: dict, batches: int) -> tuple[list[str], dict]:
    """The text of the next `batches` micro-batches of DP rank 0 from a loader state, and the state after them."""
    from data_pipeline.loader import TokenLoader
    from data_pipeline.tokenizer import load_tokenizer

    tok = load_tokenizer(str(shards.parent / "tok"))
    loader = TokenLoader(str(shards), seq_len=32, batch_size=2, dp_rank=0, dp_size=2, seed=1234, shuffle_buffer=0)
    loader.load_state_dict(state)
    stream, texts = iter(loader), []
    for _ in range(batches):
        texts += [tok.decode(row.tolist()) for row in next(stream)["tokens"]]
    return texts, loader.state_dict()


def fresh_loader(shards: Path) -> dict:
    """DP rank 0's loader state before its first batch."""
    from data_pipeline.loader import TokenLoader

    return TokenLoader(str(shards), seq_len=32, batch_size=2, dp_rank=0, dp_size=2, seed=1234,
                       shuffle_buffer=0).state_dict()


def poisoned(texts: list[str]) -> int:
    return sum(bool(POISON.search(t)) for t in texts)


def rank0_loader(step_dir: Path) -> dict:
    from pretrain.checkpoint import files

    return files.load(step_dir / "rank_00000.pt")["loader"]


@dataclass
class Episode:
    """The spike episode on 2 ranks: `run` trained straight through it (tracked; `straight` is that launch), and
    `again` killed inside its spike window (at step `killed_at`, before the spike is confirmed: nothing recorded),
    which the first test goes on resuming. `killed` is a copy of `again` as the kill left it (its newest checkpoint
    the last one before the spike), for a test that resumes it on another layout."""
    run: Path
    straight: subprocess.CompletedProcess
    again: Path
    killed_at: int
    killed: Path


@pytest.fixture(scope="module")
def episode(shards, tmp_path_factory) -> Episode:
    base = tmp_path_factory.mktemp("episode")
    run, again = base / "run", base / "again"
    straight = launch(shards, run, "tracking.enabled=true")
    assert straight.returncode == 0, straight.stderr[-3000:]
    rollbacks = records(run / "rollbacks.jsonl")
    assert len(rollbacks) == 1, rollbacks
    killed_at = rollbacks[0]["detected_at"]
    p = launch(shards, again, PRETRAIN_INJECT_SIGKILL=f"before_step:{killed_at}")
    assert p.returncode != 0 and not (again / "rollbacks.jsonl").exists(), p.stderr[-2000:]
    return Episode(run, straight, again, killed_at, copy_of(again, base / "killed"))


@pytest.mark.distributed
def test_poisoned_stretch_rolls_back_once_and_resumes_to_the_same_decisions(shards, episode):
    run, p = episode.run, episode.straight
    (rb,) = records(run / "rollbacks.jsonl")  # exactly one rollback
    first, target, detected = rb["first_step"], rb["restored_step"], rb["detected_at"]
    # the newest checkpoint before the step preceding the spike (which may hold the start of the stretch)
    assert target == max(s for s in range(EVERY, first - 1, EVERY))
    assert re.search(rf"loss spike at steps {first}-{detected} .*: rollback 1 of at most 3: restored "
                     rf"step_{target}; the {detected - target + SKIP} global batches read since", p.stderr), \
        p.stderr[-3000:]
    ahead = rb["lookahead"]["skipped"]
    assert rb["skipped_batches"] == detected - target + SKIP + ahead
    trained = records(run / "metrics.jsonl")
    assert [r["step"] for r in trained] == list(range(1, STEPS + 1)), "one record per trained step"
    spiked = [r["loss"] for r in rb["discarded"] if r["step"] >= first]
    calm = [r["loss"] for r in trained if target - 5 < r["step"] <= target]
    assert min(spiked) > max(calm) + 0.5, (spiked, calm)
    assert all(r["rollbacks"] == (1 if r["step"] > target else 0) for r in trained)
    assert max(r["loss"] for r in trained if r["step"] > target) < min(spiked) - 0.5, "no spike after the rollback"

    # The poison was in the window the rollback skipped, and none of it in what was trained after the rollback:
    # replaying rank 0's loader from the recorded state reaches the final checkpoint's cursor exactly.
    window, _ = replay(shards, rank0_loader(run / f"step_{target}"), rb["skipped_batches"] * 2)
    assert any(POISON.search(t) for t in window), "the spike window read the poisoned documents"
    after = json.loads((run / "rollbacks" / "1" / "rank_00000.json").read_text())
    texts, end = replay(shards, after, (STEPS - target) * 2)
    assert not any(POISON.search(t) for t in texts), "a poisoned sample was trained on after the rollback"
    assert end == rank0_loader(run / f"step_{STEPS}"), "the run trained exactly the replayed batches"

    from mlflow import MlflowClient
    client = MlflowClient(f"sqlite:///{run}/mlruns/mlflow.db")
    (mlrun,) = client.search_runs([client.get_experiment_by_name("demo").experiment_id])
    assert mlrun.data.tags["rollbacks"] == "1" and f"restored step {target}" in mlrun.data.tags["rollback_1"]
    assert sorted(m.step for m in client.get_metric_history(mlrun.info.run_id, "loss")) == list(range(1, STEPS + 1))

    # Killed inside the spike window (before it is confirmed: the fixture's second launch), then right after the
    # rollback is recorded: each resume reaches the same decisions, and the run ends bitwise where the uninterrupted
    # one did.
    again = episode.again
    assert episode.killed_at == detected
    p = launch(shards, again, PRETRAIN_INJECT_SIGKILL="after_rollback")
    assert p.returncode != 0 and (again / "latest").read_text().strip() == f"step_{target}", p.stderr[-2000:]
    assert not [d for d in again.glob("step_*") if int(d.name[5:]) > target], "the spike's checkpoints are gone"
    p = launch(shards, again)
    assert p.returncode == 0, p.stderr[-3000:]
    assert f"rollback 1 restored this checkpoint: the loader continues past the {rb['skipped_batches']}" in p.stderr
    (rb_again,) = records(again / "rollbacks.jsonl")
    assert {k: rb_again[k] for k in ("first_step", "detected_at", "restored_step", "loss", "loss_z")} == \
        {k: rb[k] for k in ("first_step", "detected_at", "restored_step", "loss", "loss_z")}
    same = ("step", "loss", "grad_norm", "loss_z", "grad_norm_z", "rollbacks")
    assert [{k: r[k] for k in same} for r in records(again / "metrics.jsonl")] == \
        [{k: r[k] for k in same} for r in trained]


LONG = range(40, 48)  # 8 poisoned documents in a row: about 10 global batches from step 30 on
LONG_STEPS = 40


@pytest.fixture(scope="module")
def long_block(tmp_path_factory) -> Path:
    return poisoned_shards(tmp_path_factory.mktemp("long") / "data", poison=LONG)


@pytest.mark.distributed
def test_a_poisoned_stretch_longer_than_the_window_costs_one_rollback_and_is_never_trained(long_block, tmp_path):
    """The look-ahead: after restoring, the batches ahead are judged forward-only and skipped while spike-level
    (and the calm one at the stretch's edge), so the loop never trains into the rest of the stretch."""
    state, per_step = fresh_loader(long_block), []
    for _ in range(LONG_STEPS + 20):
        texts, state = replay(long_block, state, 2)
        per_step.append(poisoned(texts))
    assert sum(1 for n in per_step if n) > 3 * CONFIRM, f"the planted block is long enough: {per_step}"

    run = tmp_path / "run"
    p = launch(long_block, run, f"train.max_steps={LONG_STEPS}")
    assert p.returncode == 0, p.stderr[-3000:]
    (rb,) = records(run / "rollbacks.jsonl")  # exactly one rollback
    target, ahead = rb["restored_step"], rb["lookahead"]
    assert ahead["ended"] == "calm" and ahead["skipped"] > 2, ahead
    assert all(j["spike_level"] for j in ahead["judged"][:-1]) and not ahead["judged"][-1]["spike_level"]
    assert rb["skipped_batches"] == rb["detected_at"] - target + SKIP + ahead["skipped"]
    assert re.search(rf"rollback 1 of at most 3: restored step_{target}; .* a forward-only look-ahead skipped the "
                     rf"next {ahead['skipped']} too: {ahead['skipped'] - 1} still spike-level, then a calm one",
                     p.stderr), p.stderr[-3000:]
    assert [r["step"] for r in records(run / "metrics.jsonl")] == list(range(1, LONG_STEPS + 1))

    # Replaying the loader: no poisoned sample in any step that was kept (1..target, then from the recorded state
    # to the end), and the run trained exactly the replayed batches.
    kept, at_target = replay(long_block, fresh_loader(long_block), target * 2)
    assert not poisoned(kept) and at_target == rank0_loader(run / f"step_{target}")
    after = json.loads((run / "rollbacks" / "1" / "rank_00000.json").read_text())
    texts, end = replay(long_block, after, (LONG_STEPS - target) * 2)
    assert not poisoned(texts), "a poisoned sample was trained on after the rollback"
    assert end == rank0_loader(run / f"step_{LONG_STEPS}")

    # Killed during the look-ahead (nothing recorded: the resume sees the same spike and looks ahead again), then
    # right after the rollback was recorded (the resume starts past everything the look-ahead skipped): the run
    # ends where the uninterrupted one did.
    again = tmp_path / "again"
    p = launch(long_block, again, f"train.max_steps={LONG_STEPS}", PRETRAIN_INJECT_SIGKILL="during_lookahead")
    assert p.returncode != 0 and not (again / "rollbacks.jsonl").exists(), p.stderr[-2000:]
    p = launch(long_block, again, f"train.max_steps={LONG_STEPS}", PRETRAIN_INJECT_SIGKILL="after_rollback")
    assert p.returncode != 0 and (again / "latest").read_text().strip() == f"step_{target}", p.stderr[-2000:]
    p = launch(long_block, again, f"train.max_steps={LONG_STEPS}")
    assert p.returncode == 0, p.stderr[-3000:]
    assert f"the loader continues past the {rb['skipped_batches']} batches it skipped" in p.stderr, p.stderr[-2000:]
    (rb_again,) = records(again / "rollbacks.jsonl")
    assert {k: rb_again[k] for k in ("first_step", "detected_at", "restored_step", "lookahead")} == \
        {k: rb[k] for k in ("first_step", "detected_at", "restored_step", "lookahead")}
    same = ("step", "loss", "grad_norm", "loss_z", "grad_norm_z", "rollbacks")
    assert [{k: r[k] for k in same} for r in records(again / "metrics.jsonl")] == \
        [{k: r[k] for k in same} for r in records(run / "metrics.jsonl")]


@pytest.mark.distributed
def test_a_pipeline_run_rolls_back_in_process(shards, tmp_path):
    """DeepSpeed's pipeline engine reloads the restored checkpoint into the live stages (PP2, ZeRO-1), and the
    look-ahead judges the batches ahead with its eval_batch."""
    run = tmp_path / "run"
    p = launch(shards, run, "parallel.pp=2", "parallel.zero_stage=1", "train.spike.window=12",
               "train.spike.threshold=10")  # one DP rank: a noisier loss than two ranks average
    assert p.returncode == 0, p.stderr[-3000:]
    (rb,) = records(run / "rollbacks.jsonl")
    assert rb["layout"] == {"tp": 1, "pp": 2, "dp": 1, "cp": 1}
    assert rb["lookahead"]["ended"] == "calm", "the look-ahead ran forward-only through the pipeline's eval path"
    assert [r["step"] for r in records(run / "metrics.jsonl")] == list(range(1, STEPS + 1))


@pytest.mark.distributed
def test_a_rollback_to_a_checkpoint_of_another_layout_restarts_from_it(shards, episode, tmp_path):
    """A run resumed on fewer ranks spikes before its first checkpoint: the checkpoint to return to has the old
    layout, which only a start re-slices. The rollback is recorded, the run exits 42 (requeue), and the next
    launch starts from it with the loader past the spike. The 2-rank run is the episode's, killed inside the spike
    window: its newest checkpoint, step_25, is the last one before the spike."""
    run = copy_of(episode.killed, tmp_path / "run")
    assert (run / "latest").read_text().strip() == "step_25", "the 2-rank run stopped just after step_25"
    p = launch(shards, run, "checkpoint.every=50", nproc=1)  # re-sliced for 1 rank, no checkpoint before the spike
    assert p.returncode == 42, p.stderr[-3000:]
    assert re.search(r"restored step_25; .* step_25 has another layout, which only a start re-slices: restarting "
                     r"from it .*\n.*\[train\] restarting to roll back at step 25; rolled back to its checkpoint, "
                     r"nothing new to save; exit 42 \(requeue\)", p.stderr), p.stderr[-3000:]
    p = launch(shards, run, "checkpoint.every=50", nproc=1)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "re-slicing weights and optimizer state" in p.stderr and "rollback 1 restored this checkpoint" in p.stderr
    (rb,) = records(run / "rollbacks.jsonl")
    assert rb["restored_step"] == 25 and rb["layout"]["dp"] == 1
    assert [r["step"] for r in records(run / "metrics.jsonl")] == list(range(1, STEPS + 1))


@pytest.mark.parametrize("bound, skipped, ended", [(64, 4, "calm"), (2, 2, "max_skip_batches"), (0, 0, "off")])
def test_the_look_ahead_skips_spike_level_batches_and_the_calm_edge_up_to_its_bound(tmp_path, bound, skipped, ended):
    """The decisions alone (no run): global batches of 2 micro-batches whose forward loss is given, judged against
    a flat history of loss 3.0; the loader's state is taken after the last batch judged."""
    from types import SimpleNamespace

    from pretrain.config import load_config
    from pretrain.train.rollback import SpikeGuard

    cfg = load_config(None, ["train.spike.enabled=true", "train.spike.window=8", f"train.spike.max_skip_batches="
                             f"{bound}", "train.grad_accum=2", "checkpoint.every=5", f"checkpoint.dir={tmp_path}"])
    env = SimpleNamespace(rank=0, any_of=lambda *flags: flags)
    guard = SpikeGuard(cfg, env, ckpt=None)
    for step in range(1, 9):
        guard.detector.observe(step, 3.0, 1.0, False)
    losses = [9.0, 9.0, 8.0, 8.0, 7.5, 7.5, 3.0, 3.0, 3.0, 3.0]  # 3 spike-level batches, then calm ones
    read: list[float] = []

    def batches():
        for x in losses:
            read.append(x)
            yield x

    engine = SimpleNamespace(eval_step=next)  # a micro-batch "is" its loss
    loader = SimpleNamespace(state_dict=lambda: {"read": len(read)})
    ahead, state = guard._look_ahead(engine, loader, batches())
    assert (ahead["skipped"], ahead["ended"]) == (skipped, ended)
    assert [j["spike_level"] for j in ahead["judged"]] == [True, True, True, False][:skipped]
    assert state == {"read": 2 * skipped}, "the loader is past every judged batch, and no further"


def test_a_spike_past_max_rollbacks_needs_a_person(shards, tmp_path):
    run = tmp_path / "run"
    p = launch(shards, run, "train.spike.max_rollbacks=0", nproc=1)
    assert p.returncode == 3, p.stderr[-3000:]
    assert re.search(r"\[train\] loss spike at steps \d+-\d+ .*: 0 rollback\(s\) taken, train.spike.max_rollbacks=0; "
                     r"the run needs a person: .*; exit 3", p.stderr), p.stderr[-3000:]
    assert not (run / "rollbacks.jsonl").exists()
