"""`pretrain eval` answers lm-evaluation-harness as lm-eval's own `hf` backend answers for the exported model.

The real client is the oracle: each checkpoint is exported with `pretrain export-hf` and scored by lm-eval's `hf`
backend (transformers' LlamaForCausalLM), in fp32; `pretrain eval` scores the checkpoint itself, in place, on one
process or on a TP2 / PP2 layout of 2 ranks. Every request's log-likelihood must agree within 1e-4 and every
metric must be the same. The tasks are local lm-eval YAML files (tests/eval/eval_tasks.py): no hub is reachable.
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

lm_eval = pytest.importorskip("lm_eval")
pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # lm-eval's hf backend imports it

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "train"))
from eval_tasks import GEN, MC, TEXT, write_tasks  # noqa: E402
from shared_runs import plain_run  # noqa: E402
from train_common import launch, run_python, tiny_shards, train_args  # noqa: E402

from pretrain.cli import main as cli  # noqa: E402

pytestmark = pytest.mark.slow  # trains checkpoints and runs lm-eval on them

LAYOUTS = {"1 rank": [], "tp2 on 2 ranks": ["parallel.tp=2"], "pp2 on 2 ranks": ["parallel.pp=2"]}
TASKS = {"1 rank": [MC, TEXT, GEN], "tp2 on 2 ranks": [MC, TEXT, GEN], "pp2 on 2 ranks": [MC, TEXT]}  # decoding: pp 1


@pytest.fixture(scope="module")
def tasks(tmp_path_factory) -> Path:
    return write_tasks(tmp_path_factory.mktemp("tasks"))


def _checkpoint(layout: str, tmp_path_factory) -> Path:
    """A run trained on `layout` (the 1-rank one is the session's shared run)."""
    if not LAYOUTS[layout]:
        return plain_run(tmp_path_factory)[0]
    root = tmp_path_factory.mktemp("ckpt")
    data = tiny_shards(root / "data")
    p = launch(2, train_args(data / "shards", root / "run", "train.max_steps=6", "optim.lr=0.01", *LAYOUTS[layout]))
    assert p.returncode == 0, p.stderr[-3000:]
    return root / "run"


def _hf_results(checkpoint: Path, tasks: Path, names: list[str], out: Path) -> dict:
    """lm-eval's `hf` backend on `pretrain export-hf` of the checkpoint, fp32, with our eos as the prefix token
    (documents were packed after an eos; lm-eval's default would be the tokenizer's bos)."""
    from lm_eval.tasks import TaskManager

    assert cli(["export-hf", "--checkpoint", str(checkpoint), "--out", str(out), "--dtype", "fp32"]) == 0
    eos = json.loads((out / "config.json").read_text())["eos_token_id"]
    return lm_eval.simple_evaluate(
        model="hf", model_args={"pretrained": str(out), "dtype": "float32", "device": "cpu", "prefix_token_id": eos},
        tasks=names, batch_size=4, log_samples=True, verbosity="ERROR",
        task_manager=TaskManager(include_path=str(tasks), include_defaults=False))


def _our_samples(output: Path, task: str) -> list[dict]:
    (path,) = output.rglob(f"samples_{task}_*.jsonl")
    return [json.loads(line) for line in path.read_text().splitlines()]


def _answers(sample: dict) -> list[tuple[float, bool | str | None]]:
    """A sample's responses: (log-likelihood, greedy) per request; a rolling request has no greedy flag; a
    generated text is (0, the text)."""
    out = []
    for resp in sample["resps"]:
        r = resp[0]
        if isinstance(r, (list, tuple)):
            out.append((float(r[0]), str(r[1]) == "True"))
        else:
            try:
                out.append((float(r), None))
            except ValueError:
                out.append((0.0, r))
    return out


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_scores_equal_lm_evals_hf_backend_on_the_export(layout, tasks, tmp_path, tmp_path_factory):
    checkpoint = _checkpoint(layout, tmp_path_factory)
    ours_dir = tmp_path / "ours"
    args = ["-m", "pretrain", "eval", "--checkpoint", str(checkpoint), "--tasks", ",".join(TASKS[layout]),
            "--include_path", str(tasks), "--log_samples", "--output_path", str(ours_dir), "--batch_size", "4"]
    if LAYOUTS[layout]:  # in place, on the layout it was trained on
        flag = LAYOUTS[layout][0].split("=")[0].split(".")[1]
        p = launch(2, [*args, f"--{flag}", "2"])
    else:
        p = run_python(args)
    assert p.returncode == 0, p.stderr[-4000:]

    theirs = _hf_results(checkpoint, tasks, TASKS[layout], tmp_path / "hf")
    for task in TASKS[layout]:
        ours = {s["doc_id"]: _answers(s) for s in _our_samples(ours_dir, task)}
        hf = {s["doc_id"]: _answers(s) for s in theirs["samples"][task]}
        assert ours.keys() == hf.keys() and ours, task
        # 1e-4, or 1e-6 of the value for a long text's sum (hf adds ~100 fp32 log-probs: at |sum| ~ 1000 one fp32
        # step is 6e-5, so its own rounding reaches 1e-4; ours sums in fp64)
        worst = max(abs(a[0] - b[0]) / (1e-4 + 1e-6 * abs(b[0]))
                    for d in hf for a, b in zip(ours[d], hf[d], strict=True))
        assert worst < 1, f"{task}: log-likelihoods differ by {worst:.2f} x the tolerance"
        assert [a[1] for d in hf for a in ours[d]] == [b[1] for d in hf for b in hf[d]], task  # greedy / text
        if task == GEN:
            assert any(a[1] for d in ours for a in ours[d]), "every generation was empty: nothing was compared"

    record = json.loads((checkpoint / "evals" / f"{(checkpoint / 'latest').read_text().strip()}.json").read_text())
    for task, values in theirs["results"].items():
        for key, value in values.items():
            if "," in key and isinstance(value, float) and math.isfinite(value):
                metric, _ = key.split(",", 1)
                assert record["scores"][f"{task}/{metric}"] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    assert record["layout"]["tp"] * record["layout"]["pp"] == (2 if LAYOUTS[layout] else 1)
    assert "scores of step" in p.stderr and str(checkpoint / "evals") in p.stderr
