"""Non-finite guard and checkpoint refusal, end to end through `pretrain train` (one process, real engine).

One run: steps 3, 5 and 6 get a NaN loss injected (PRETRAIN_INJECT_NONFINITE, see pretrain/train/loop.py); with
train.max_nonfinite_steps=2 the run skips step 3, goes on, and aborts at step 6 with exit 3, never checkpointing a
step from a bad streak. Then the newest checkpoint is corrupted: `resume: auto` refuses it, says so, falls back
to the previous complete one, and the finished metrics.jsonl -- and the MLflow run in the embedded local store --
still hold every step exactly once. Last,
`pretrain generate` samples from the finished run (and an intermediate step) and `pretrain export-hf` writes it for transformers.
"""
from __future__ import annotations

import pytest
from train_common import losses, run_python, tiny_shards, train_args

from pretrain.cli import main as cli

pytestmark = pytest.mark.slow  # trains, then resumes from damaged checkpoints


def test_nonfinite_skip_abort_then_corrupt_checkpoint_fallback(tmp_path, capfd):
    shards = tiny_shards(tmp_path / "data") / "shards"
    run = tmp_path / "run"
    args = train_args(shards, run, "train.max_steps=10", "checkpoint.every=1", "checkpoint.keep=5",
                      "train.max_nonfinite_steps=2", "tracking.enabled=true")  # the default local store
    p = run_python(args, PRETRAIN_INJECT_NONFINITE="3,5,6")
    assert p.returncode == 3, p.stderr[-3000:]
    assert "aborting at step 6: 2 non-finite steps in a row (train.max_nonfinite_steps=2)" in p.stderr
    first = losses(run)
    assert sorted(first) == [1, 2, 3, 4, 5, 6]
    assert [s for s, v in first.items() if v == "nan"] == [3, 5, 6], "skipped steps are recorded, visibly"
    assert sorted(p.name for p in run.glob("step_*")) == ["step_1", "step_2", "step_4"], \
        "a step of a non-finite streak is never checkpointed"
    assert (run / "latest").read_text().strip() == "step_4"

    victim = next((run / "step_4" / "model").rglob("*.pt"))
    victim.write_bytes(victim.read_bytes()[:-16])
    p = run_python(args)
    assert p.returncode == 0, p.stderr[-3000:]
    assert f"refusing: checkpoint {run / 'step_4'} is corrupt" in p.stderr
    assert f"falling back to the previous complete checkpoint {run / 'step_2'}" in p.stderr
    assert f"resuming from {run / 'step_2'} at step 2" in p.stderr
    second = losses(run)  # asserts no duplicate step
    assert sorted(second) == list(range(1, 11))
    assert [second[s] for s in (1, 2)] == [first[1], first[2]]
    assert all(isinstance(v, float) for s, v in second.items()), "no injection the second time"

    from mlflow import MlflowClient  # the embedded default store: <checkpoint.dir>/mlruns/mlflow.db
    client = MlflowClient(f"sqlite:///{run}/mlruns/mlflow.db")
    (mlrun,) = client.search_runs([client.get_experiment_by_name("demo").experiment_id])
    assert mlrun.info.status == "FINISHED", "the aborted run was continued (same run id) and finished"
    logged = [m.step for m in client.get_metric_history(mlrun.info.run_id, "loss")]
    assert sorted(logged) == list(range(1, 11)), "no step twice, even after falling back past a flushed one"

    # Any committed checkpoint is self-contained for sampling: the latest, or an intermediate one. The commands
    # run in this process (the same CLI entry point as `python -m pretrain`): three more interpreters importing torch
    # would cost more than the whole run above.
    assert cli(["generate", "--checkpoint", str(run), "--prompt", "the model", "--max-new-tokens", "8",
                "--temperature", "0"]) == 0
    out, err = capfd.readouterr()
    assert out.startswith("the model"), err[-2000:]
    assert cli(["generate", "--checkpoint", str(run / "step_9"), "--prompt", "x", "--max-new-tokens", "4"]) == 0
    out, err = capfd.readouterr()
    assert out.startswith("x"), err[-2000:]
    assert cli(["export-hf", "--checkpoint", str(run), "--out", str(tmp_path / "hf")]) == 0, capfd.readouterr().err
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in (tmp_path / "hf").iterdir()}
