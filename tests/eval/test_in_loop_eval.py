"""`eval.tasks` inside the training loop, and the held-out bits per byte: logged at the steps they are due, to
metrics.jsonl and a real MLflow store, and the schedule kept across a resume. Plus the one-line refusals."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval")

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "train"))
from eval_tasks import MC, TEXT, write_tasks  # noqa: E402
from train_common import launch, losses, run_python, tiny_shards, train_args  # noqa: E402

pytestmark = pytest.mark.slow  # trains with evaluations


def _metric_steps(run_dir: Path, key: str) -> list[int]:
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlruns' / 'mlflow.db'}")
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    return sorted(m.step for m in client.get_metric_history(run.info.run_id, key))


def test_in_loop_evals_at_their_steps_in_metrics_and_mlflow_and_after_a_resume(tmp_path):
    tasks = write_tasks(tmp_path / "tasks")
    data = tiny_shards(tmp_path / "data")
    run = tmp_path / "run"
    base = ["tracking.enabled=true", "tracking.system_metrics_s=0", f"data.val_path={data / 'shards'}",
            "train.eval_every=2", "train.eval_steps=2", "checkpoint.every=2"]
    common = [*base, f"eval.tasks=[{MC},{TEXT}]", "eval.every=2", f"eval.include_path={tasks}", "eval.limit=4",
              "eval.batch_size=4"]
    p = launch(2, train_args(data / "shards", run, "train.max_steps=4", *common))
    assert p.returncode == 0, p.stderr[-4000:]
    p = launch(2, train_args(data / "shards", run, "train.max_steps=6", *common))  # resumes from step 4
    assert p.returncode == 0, p.stderr[-4000:]
    assert "at step 4" in p.stderr

    # evaluating leaves training alone: the same losses, bit for bit, as a run without eval.tasks
    plain = tmp_path / "plain"
    p = launch(2, train_args(data / "shards", plain, "train.max_steps=4", *base))
    assert p.returncode == 0, p.stderr[-4000:]
    assert {s: v for s, v in losses(run).items() if s <= 4} == losses(plain)

    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    evaluated = {r["step"]: r["downstream"] for r in records if r.get("downstream")}
    assert sorted(evaluated) == [2, 4, 6]
    for scores in evaluated.values():
        assert 0 <= scores[f"{MC}/acc"] <= 1 and scores[f"{TEXT}/bits_per_byte"] > 0
        assert 0 < scores["time_share"] < 1
    bpb = {r["step"]: r["val_bpb"] for r in records if r.get("val_bpb") is not None}
    assert sorted(bpb) == [2, 4, 6] and all(0 < v < 20 for v in bpb.values())
    # bits per byte and the loss per token measure the same losses: their ratio is bytes per token over ln 2,
    # the same at every eval (the same held-out batches)
    ratios = {s: r["val_loss"] / r["val_bpb"] for s, r in ((r["step"], r) for r in records) if s in bpb}
    assert max(ratios.values()) == pytest.approx(min(ratios.values()), rel=1e-9)
    assert min(ratios.values()) > math.log(2)  # a token spells more than one byte
    assert _metric_steps(run, f"eval/{MC}/acc") == [2, 4, 6]
    assert _metric_steps(run, "val_bpb") == [2, 4, 6]

    # `pretrain eval` of a checkpoint logs to the MLflow run that trained it, at the checkpoint's step
    p = run_python(["-m", "pretrain", "eval", "--checkpoint", str(run / "step_4"), "--tasks", TEXT,
                    "--include_path", str(tasks)])
    assert p.returncode == 0, p.stderr[-3000:]
    assert _metric_steps(run, f"eval/{TEXT}/bits_per_byte") == [2, 4, 4, 6]  # in-loop at 2, 4, 6; this one at 4
    assert json.loads((run / "evals" / "step_4.json").read_text())["step"] == 4


def test_token_scores_are_log_softmax_and_argmax():
    """The head's evaluation answer: log p(target) and "target is the argmax", whatever the chunking."""
    from pretrain.kernels.linear_cross_entropy import EAGER, token_scores

    g = torch.Generator().manual_seed(0)
    hidden, weight = torch.randn(37, 16, generator=g), torch.randn(50, 16, generator=g)
    logits = hidden @ weight.t()
    targets = torch.randint(0, 50, (37,), generator=g)
    targets[::2] = logits.argmax(1)[::2]  # half of them the most likely token
    want = torch.log_softmax(logits, -1).gather(1, targets[:, None]).squeeze(1)
    for chunk in (0, 5):
        out = token_scores(hidden, weight, targets, EAGER, chunk=chunk)
        torch.testing.assert_close(out[:, 0], want, rtol=1e-6, atol=1e-6)
        assert out[:, 1].bool().tolist() == (logits.argmax(1) == targets).tolist()


def test_unknown_task_is_one_line_naming_the_closest(tmp_path):
    tasks = write_tasks(tmp_path / "tasks")
    data = tiny_shards(tmp_path / "data")
    p = run_python(train_args(data / "shards", tmp_path / "run", "train.max_steps=2", "eval.tasks=[tiny_mcq]",
                              "eval.every=1", f"eval.include_path={tasks}"))
    assert p.returncode == 2, p.stderr[-3000:]
    last = p.stderr.strip().splitlines()[-1]
    assert "unknown lm-eval task 'tiny_mcq' (closest: tiny_mc" in last, p.stderr[-2000:]


def test_eval_refuses_what_it_cannot_do_in_one_line(tmp_path, tmp_path_factory):
    """A task whose data is not on disk (an offline cluster), and lm-eval's --model chosen by the user."""
    from shared_runs import plain_run

    checkpoint = plain_run(tmp_path_factory)[0]
    tasks = write_tasks(tmp_path / "tasks", missing_data=True)
    p = run_python(["-m", "pretrain", "eval", "--checkpoint", str(checkpoint), "--tasks", "tiny_gone",
                    "--include_path", str(tasks), "--output_path", str(tmp_path / "out")], HF_DATASETS_OFFLINE="1")
    assert p.returncode == 2, p.stderr[-3000:]
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "not_fetched.jsonl" in last and "HF_DATASETS_OFFLINE=1" in last, last

    from pretrain.cli import main as cli

    assert cli(["eval", "--checkpoint", str(checkpoint), "--model", "hf", "--tasks", MC]) == 2


def test_simple_evaluate_takes_the_registered_model_by_name(tmp_path, tmp_path_factory):
    """`import pretrain.eval.lm` and lm-eval's own Python API runs a checkpoint in one process."""
    from shared_runs import plain_run

    checkpoint = plain_run(tmp_path_factory)[0]
    tasks = write_tasks(tmp_path / "tasks")
    script = (
        "import json, sys, lm_eval\n"
        "from lm_eval.tasks import TaskManager\n"
        "import pretrain.eval.lm\n"
        f"r = lm_eval.simple_evaluate(model='pretrain', model_args='checkpoint={checkpoint}', tasks=['{MC}'],\n"
        f"    task_manager=TaskManager(include_path='{tasks}', include_defaults=False), verbosity='ERROR')\n"
        f"print(json.dumps(r['results']['{MC}']['acc,none']))\n")
    p = run_python(["-c", script])
    assert p.returncode == 0, p.stderr[-3000:]
    assert 0 <= json.loads(p.stdout.strip().splitlines()[-1]) <= 1


def test_a_checkpoint_without_its_tokenizer_is_one_line(tmp_path, tmp_path_factory, capsys):
    from shared import without_tokenizer
    from shared_runs import plain_run

    from pretrain.cli import main as cli

    copy = without_tokenizer(plain_run(tmp_path_factory)[0], tmp_path / "run").parent
    capsys.readouterr()
    assert cli(["eval", "--checkpoint", str(copy), "--tasks", MC]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds no tokenizer" in err[0] and "--tokenizer" in err[0], err


def test_generation_on_a_pipeline_is_refused_in_one_line():
    from types import SimpleNamespace

    from pretrain.eval.lm import CannotEvaluate, PretrainLM

    env = SimpleNamespace(dp_rank=0, dp_size=1)
    replica = SimpleNamespace(leader=True, env=env, engine=SimpleNamespace(pipeline=True))
    lm = PretrainLM(replica, SimpleNamespace(vocab_size=10, eos_id=1), max_length=32)
    with pytest.raises(CannotEvaluate, match="--pp 1"):
        lm.generate_until([SimpleNamespace(args=("a", {"until": ["."]}))])


def test_scores_of_an_imported_checkpoint_go_beside_it_not_into_it(tmp_path):
    """A training checkpoint's scores go to its run's evals/; an import's (or an average's) directory may hold no
    file its manifest does not list, so its scores go to evals/<its name> beside it."""
    from pretrain.eval.results import evals_dir, write_step_results

    assert evals_dir(tmp_path / "run" / "step_40") == tmp_path / "run" / "evals"
    written = write_step_results(tmp_path / "imported", 0, {"step": 0})
    assert written == tmp_path / "evals" / "imported" / "step_0.json"
    assert not (tmp_path / "imported").exists()


def test_lm_evals_builtin_tasks_are_indexed_only_when_a_task_needs_them(tmp_path):
    """`pretrain eval` spares lm-eval's CLI its ~15k-file index when every task asked for is a local one."""
    from pretrain.eval.command import _tasks_asked
    from pretrain.eval.tasks import local_task_manager

    tasks = str(write_tasks(tmp_path / "tasks"))
    assert _tasks_asked(["--tasks", f"{MC},{TEXT}", "hellaswag", "--limit", "4"]) == [MC, TEXT, "hellaswag"]
    assert _tasks_asked(["-t", MC, "--include_path", tasks]) == [MC] == _tasks_asked([f"--tasks={MC}"])
    assert local_task_manager(tasks, [MC, TEXT]) is not None
    assert local_task_manager(tasks, [MC, "hellaswag"]) is None
    assert local_task_manager(None, [MC]) is None and local_task_manager(tasks, []) is None
