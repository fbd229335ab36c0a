"""`pretrain eval --checkpoint RUN [--tp N --pp N] [lm-eval's own options]`.

Every rank loads the checkpoint onto this launch's layout (pretrain/eval/session.py). Each data-parallel
replica's leader then runs lm-eval's own command line (`lm-eval run --model pretrain --model_args
checkpoint=RUN ...` plus the user's options, which therefore mean exactly what they mean to `lm-eval`), while
the replica's other ranks follow its forwards. Rank 0 finally writes `<run>/evals/step_<N>.json` and logs the
scores to the MLflow run that trained the checkpoint, at its step.
"""
from __future__ import annotations

import contextlib
import functools
import json
import sys
import time
from pathlib import Path
from typing import Iterator

from pretrain.checkpoint import read_meta
from pretrain.config import ConfigError
from pretrain.console import say
from pretrain.eval.lm import CannotEvaluate  # importing it registers lm-eval's `--model pretrain`
from pretrain.eval.results import evals_dir, flat_scores, write_step_results
from pretrain.eval.session import Session, open_session
from pretrain.eval.tasks import local_task_manager, task_manager, unknown_tasks_line
from pretrain.run.paths import CONFIG, LM_EVAL_OUTPUT
from pretrain.telemetry.model_registry import store_uri


def run_eval(checkpoint: str, lm_eval_args: list[str], *, tp: int = 1, pp: int = 1, dtype: str | None = None,
             tokenizer: str | None = None, device: str = "auto") -> int:
    if any(a in ("--model", "--model_args") or a.startswith(("--model=", "--model_args=")) for a in lm_eval_args):
        raise ConfigError("pretrain eval chooses lm-eval's --model and --model_args itself (the checkpoint); "
                          "leave them out")
    session = open_session(checkpoint, tp=tp, pp=pp, tokenizer=tokenizer, dtype=dtype, device=device)
    env, replica = session.env, session.replica
    step = read_meta(session.step_dir).step
    output = _option(lm_eval_args, "--output_path") or str(evals_dir(session.step_dir) / LM_EVAL_OUTPUT)
    argv = ["run", "--model", "pretrain", "--model_args", f"checkpoint={checkpoint}", *lm_eval_args]
    if _option(lm_eval_args, "--output_path") is None:
        argv += ["--output_path", output]
    started = time.time()
    try:
        if replica.leader:
            try:
                _lm_eval_cli(argv, lm_eval_args)
            finally:
                replica.close()
        else:
            replica.serve()
        if env.rank == 0:
            _record(session, step, output, started)
    finally:
        env.destroy()
    return 0


def _record(session: Session, step: int, output: str, started: float) -> None:
    """evals/step_<N>.json, MLflow, and the lines that say where everything went."""
    found = _newest_results(Path(output), started)
    if found is None:
        say(f"lm-eval wrote no results under {output}", "eval")
        return
    results = json.loads(found.read_text())
    scores = flat_scores(results)
    lay = session.run.layout
    record = {"step": step, "checkpoint": str(session.step_dir.resolve()), "scores": scores,
              "layout": {"tp": lay.tp, "pp": lay.pp, "dp": lay.dp}, "dtype": session.run.dtype,
              "lm_eval_results": str(found.resolve()),
              "seconds": results.get("total_evaluation_time_seconds")}
    path = write_step_results(session.step_dir, step, record)
    for name, value in scores.items():
        say(f"{name} = {value:.4f}", "eval")
    say(f"scores of step {step}: {path} (lm-eval's own output: {found.parent})", "eval")
    if run_id := _log_to_mlflow(session.step_dir, step, scores):
        say(f"logged to MLflow run {run_id} at step {step}", "eval")


def _log_to_mlflow(step_dir: Path, step: int, scores: dict[str, float]) -> str | None:
    """The scores as "eval/<task>/<metric>" at the checkpoint's step, in the run that trained it (None when it was
    trained without tracking, or the store is gone: said in a line, the scores are on disk anyway)."""
    run_id = read_meta(step_dir).mlflow_run_id
    if not run_id or not (step_dir / CONFIG).exists():
        return None
    try:
        import mlflow
        from mlflow.entities import Metric

        client = mlflow.MlflowClient(tracking_uri=store_uri(step_dir))
        now = int(time.time() * 1000)
        client.log_batch(run_id, metrics=[Metric(f"eval/{k}", v, now, step) for k, v in scores.items()])
    except Exception as e:  # noqa: BLE001 - the scores are written; the store is an extra
        say(f"could not log the scores to MLflow run {run_id} ({type(e).__name__}: {str(e)[:200]})", "eval")
        return None
    return run_id


def _newest_results(output: Path, since: float) -> Path | None:
    if output.suffix == ".json":
        return output if output.exists() else None
    found = [p for p in output.rglob("results_*.json") if p.stat().st_mtime >= since - 1]
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


def _option(args: list[str], name: str) -> str | None:
    for i, a in enumerate(args):
        if a == name and i + 1 < len(args):
            return args[i + 1]
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
    return None


def _lm_eval_cli(argv: list[str], user_args: list[str]) -> None:
    """lm-eval's command line, as `lm-eval` runs it, with its failures a user can fix turned into one line."""
    import lm_eval.__main__

    with _argv(["lm-eval", *argv]), _builtin_tasks_only_if_asked(user_args):
        try:
            lm_eval.__main__.cli_evaluate()
        except SystemExit as e:  # argparse: a bad option
            if e.code not in (0, None):
                raise ConfigError(f"lm-eval refused the options {' '.join(user_args)} (its message is above)") from None
        except CannotEvaluate as e:
            raise ConfigError(str(e)) from None
        except ValueError as e:
            if str(e).startswith("Tasks not found:"):
                missing = [t.strip() for t in str(e).split(":", 1)[1].split(",")]
                raise ConfigError(unknown_tasks_line(missing, task_manager(_option(user_args, "--include_path"))))
            raise
        except (FileNotFoundError, ConnectionError, OSError) as e:
            raise ConfigError(_missing_data_line(e)) from None


def _missing_data_line(e: BaseException) -> str:
    """A task whose data is not on disk, on a host that cannot fetch it: what to do, in one line."""
    what = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
    return (f"a task's dataset could not be loaded ({type(e).__name__}: {what}); on an offline cluster fetch it "
            "ahead on a host with network into a cache every node reads (HF_DATASETS_CACHE=/data/hf-datasets "
            "python -c \"import datasets; datasets.load_dataset('<dataset_path>', '<dataset_name>')\") and run with "
            "HF_DATASETS_CACHE=/data/hf-datasets HF_DATASETS_OFFLINE=1")


@contextlib.contextmanager
def _builtin_tasks_only_if_asked(user_args: list[str]) -> Iterator[None]:
    """lm-eval's CLI indexes its ~15k built-in task files (8.7 s of CPU here) before it runs anything, and has no
    option to skip them. When every task asked for is under --include_path, its TaskManager is made without them
    for this call (as `eval.tasks` in the loop does: pretrain.eval.tasks.task_manager) - a shim around its CLI."""
    import lm_eval.tasks

    if local_task_manager(_option(user_args, "--include_path"), _tasks_asked(user_args)) is None:
        yield
        return
    original = lm_eval.tasks.TaskManager
    lm_eval.tasks.TaskManager = functools.partial(original, include_defaults=False)
    try:
        yield
    finally:
        lm_eval.tasks.TaskManager = original


def _tasks_asked(args: list[str]) -> list[str]:
    """lm-eval's --tasks / -t: one or more words, each comma-separated, or --tasks=a,b."""
    words: list[str] = []
    i = 0
    while i < len(args):
        if args[i] in ("--tasks", "-t"):
            i += 1
            while i < len(args) and not args[i].startswith("-"):
                words.append(args[i])
                i += 1
            continue
        if args[i].startswith(("--tasks=", "-t=")):
            words.append(args[i].split("=", 1)[1])
        i += 1
    return [t for w in words for t in (x.strip() for x in w.split(",")) if t]


@contextlib.contextmanager
def _argv(argv: list[str]) -> Iterator[None]:
    saved = sys.argv
    sys.argv = argv
    try:
        yield
    finally:
        sys.argv = saved
