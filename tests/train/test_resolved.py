"""The resolved run: what `pretrain train` checks before step 1, and `--dry-run` checks identically (issue 8).

Validation data, corpus size vs DP x workers, the tokenizer's files: each used to pass the dry run and fail (or
silently do the wrong thing) hours into a run. One real training run (module fixture) covers what only a run
shows: the evaluation of a weighted mixture, the tokenizer copy, the MLflow params.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from spawn import REPO, child_env
from train_common import tiny_shards, train_args


def run_py(*args: str, cwd: Path = REPO, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=cwd, env=child_env(), capture_output=True, text=True,
                          timeout=timeout)


def dry_run(*overrides: str, world: int = 1) -> subprocess.CompletedProcess:
    sets = [x for o in overrides for x in ("--set", o)]
    return run_py("-m", "pretrain", "train", "--config", "configs/debug.yaml", "--dry-run", "--world-size",
                  str(world), "--set", "tracking.enabled=false", *sets)


def prepare(inputs: str, tokenizer: str, out: str, cwd: Path) -> Path:
    p = run_py("-m", "data_pipeline", "prepare", "--input", inputs, "--tokenizer", tokenizer, "--out", out,
               "--shard-size-mb", "0.1", "--workers", "0", "--no-progress", cwd=cwd)
    assert p.returncode == 0, p.stderr[-3000:]
    return cwd / out


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return tiny_shards(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def one_document(data, tmp_path_factory) -> Path:
    """A plain .txt file is one document: shards that cannot be split over two DP ranks."""
    root = tmp_path_factory.mktemp("one_doc")
    (root / "story.txt").write_text("the model reads one long story. " * 40)
    return prepare(str(root / "story.txt"), str(data / "tok"), str(root / "shards"), cwd=root)


def test_dry_run_and_plan_import_no_torch(data):
    """Reading the vocabulary from a manifest used to import the loader, i.e. torch (seconds per call)."""
    code = ("import sys; from pretrain.cli import main; "
            f"assert main(['train', '--config', 'configs/debug.yaml', '--dry-run', '--set', "
            f"'data.path={data / 'shards'}']) == 0; "
            "assert main(['plan', '--config', 'configs/8b.yaml', '--nodes', '2']) == 0; "
            "heavy = sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'deepspeed', 'megatron'}); "
            "assert not heavy, heavy")
    p = run_py("-c", code)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "data.path: 300 documents" in p.stdout and "tokenizer: " + str(data / "tok") in p.stdout


def test_corpus_too_small_for_dp_x_workers_fails_the_dry_run(one_document):
    """Item 3: the loader's split rule (data_pipeline.plan.check_split) runs in the dry run, for its world size."""
    assert dry_run(f"data.path={one_document}", world=1).returncode == 0
    p = dry_run(f"data.path={one_document}", world=2)
    assert p.returncode == 2
    assert f"data.path: {one_document}: 1 documents cannot be split over dp_size 2 x 1 worker(s)" in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1, p.stderr


def test_launch_preflight_runs_the_same_checks_for_the_allocation(one_document, tmp_path):
    """`python -m launch` checks the run on every node before any rendezvous: here, DP 2 of a 1-document corpus."""
    from launch.plan import LaunchError, plan_from_env
    from launch.preflight import check_world

    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"data:\n  path: {one_document}\n")
    command = ["-m", "pretrain", "train", "--config", str(cfg)]
    check_world(plan_from_env({}, 1), command)
    with pytest.raises(LaunchError, match="1 documents cannot be split over dp_size 2"):
        check_world(plan_from_env({}, 2), command)


def test_val_path_is_checked_before_step_1(data, one_document, tmp_path):
    """Item 2: the validation shards exist, share the training tokenizer and suffice for every DP rank x worker."""
    shards = data / "shards"
    p = dry_run(f"data.path={shards}", f"data.val_path={tmp_path / 'nope'}")
    assert p.returncode == 2 and f"data.val_path: {tmp_path / 'nope'}" in p.stderr, p.stderr

    other_tok = tmp_path / "other_tok"
    t = run_py("-m", "data_pipeline", "train-tokenizer", "--input", str(data / "corpus.jsonl"), "--vocab-size",
               "300", "--out", str(other_tok))
    assert t.returncode == 0, t.stderr[-2000:]
    foreign = prepare(str(data / "corpus.jsonl"), str(other_tok), str(tmp_path / "foreign"), cwd=tmp_path)
    p = dry_run(f"data.path={shards}", f"data.val_path={foreign}")
    assert p.returncode == 2
    assert f"data.val_path: {foreign} was made with another tokenizer than data.path" in p.stderr, p.stderr

    p = dry_run(f"data.path={shards}", f"data.val_path={one_document}", "data.num_workers=2")
    assert p.returncode == 2
    assert f"data.val_path: {one_document}: 1 documents cannot be split over dp_size 1 x 2 worker(s)" in p.stderr

    ok = dry_run(f"data.path={shards}", f"data.val_path={shards}")
    assert ok.returncode == 0 and "data.val_path: 300 documents" in ok.stdout, ok.stderr
    assert "documents repeat within an eval" not in ok.stdout
    small = dry_run(f"data.path={shards}", f"data.val_path={one_document}")  # enough to run, not for one eval
    assert small.returncode == 0 and "data.val_path holds ~" in small.stdout
    assert "documents repeat within an eval" in small.stdout, small.stdout


def test_a_users_run_does_not_evaluate_on_the_demos_shards(data):
    """configs/debug.yaml used to default data.val_path to the demo's shards (another tokenizer than yours)."""
    from pretrain.config import load_config
    from pretrain.run.resolved import resolve_run

    assert load_config(REPO / "configs" / "debug.yaml").data.val_path is None
    run = resolve_run(load_config(REPO / "configs" / "debug.yaml", [f"data.path={data / 'shards'}"]), 1)
    assert run.val_data is None
    assert "data.val_path=" in (REPO / "pretrain" / "demo.py").read_text()  # the demo names its own


def test_missing_tokenizer_is_refused_at_start_naming_path_and_fix(data, tmp_path):
    """Item 6: a run whose checkpoints could not carry the tokenizer does not start."""
    tok = tmp_path / "tok"
    shutil.copytree(data / "tok", tok)
    shards = prepare(str(data / "corpus.jsonl"), str(tok), str(tmp_path / "shards"), cwd=tmp_path)
    shutil.rmtree(tok)
    p = dry_run(f"data.path={shards}")
    assert p.returncode == 2
    assert f"not at {tok}" in p.stderr and "set data.tokenizer=" in p.stderr, p.stderr
    assert len(p.stderr.strip().splitlines()) == 1
    assert dry_run(f"data.path={shards}", f"data.tokenizer={data / 'tok'}").returncode == 0
    other = tmp_path / "other"
    t = run_py("-m", "data_pipeline", "train-tokenizer", "--input", str(data / "corpus.jsonl"), "--vocab-size",
               "300", "--out", str(other))
    assert t.returncode == 0, t.stderr[-2000:]
    p = dry_run(f"data.path={shards}", f"data.tokenizer={other}")
    assert p.returncode == 2 and "is not the tokenizer the shards were made with" in p.stderr, p.stderr


# ------------------------------------------------------------------------------ one real run, several facts


@pytest.fixture(scope="module")
def mixture_run(data, tmp_path_factory) -> dict:
    """2 steps on a weighted two-source mixture with validation every step and MLflow on. The first source (whose
    manifest names the tokenizer) is prepared in another directory with a *relative* tokenizer path; training
    runs from the repository."""
    work = tmp_path_factory.mktemp("mixture")
    shutil.copytree(data / "tok", work / "tok")
    second = prepare(str(data / "corpus.jsonl"), "tok", "second", cwd=work)  # relative to `work`, not the repo
    run_dir = work / "run"
    args = train_args(data / "shards", run_dir, f"data.path=[{second},{data / 'shards'}]", "data.weights=[0.7,0.3]",
                      f"data.val_path={second}", "train.eval_every=1", "train.eval_steps=1", "train.max_steps=2",
                      "tracking.enabled=true")
    p = run_py(*args, timeout=400)
    assert p.returncode == 0, p.stderr[-4000:]
    step = run_dir / (run_dir / "latest").read_text().strip()
    return {"run_dir": run_dir, "step": step, "second": second, "meta": json.loads((step / "meta.json").read_text()),
            "stdout": p.stdout}


@pytest.mark.slow
def test_weighted_mixture_with_val_path_evaluates(mixture_run):
    """Item 1: validation used to get data.weights (two of them for one val source) and crash at the first eval."""
    recs = [json.loads(x) for x in (mixture_run["run_dir"] / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [1, 2]
    assert all(r["val_loss"] is not None and r["val_loss"] > 0 for r in recs)


@pytest.mark.slow
def test_checkpoint_carries_the_tokenizer_from_another_cwd(mixture_run):
    """Item 6: the shards' tokenizer path was relative to where `prepare` ran, so the copy was silently skipped."""
    from data_pipeline.tokenizer import load_tokenizer
    from pretrain import checkpoint

    copied = mixture_run["step"] / "tokenizer"
    assert (copied / "tokenizer.json").is_file()
    run = checkpoint.run_of(mixture_run["step"])
    assert load_tokenizer(str(copied)).identity == run.tokenizer.identity
    assert Path(run.tokenizer.path).is_absolute() and run.val_data.sources == (str(mixture_run["second"]),)


@pytest.mark.slow
def test_mlflow_params_are_the_resolved_values(mixture_run):
    """Item 10a: model.dim/n_layers/vocab_size were logged as None (the config's "use the flavor's/tokenizer's")."""
    import mlflow

    run_dir, meta = mixture_run["run_dir"], mixture_run["meta"]
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{run_dir.resolve() / 'mlruns' / 'mlflow.db'}")
    params = client.get_run(meta["mlflow_run_id"]).data.params
    model = meta["resolved"]["model"]
    assert params["model.dim"] == "32" and params["model.n_layers"] == "2"
    assert params["model.vocab_size"] == str(model["vocab_size"]) == "384"  # 384 tokens, padded to 128: 384
    assert params["tokenizer.vocab_size"] == "384" and params["layout.dp"] == "1"
    assert int(params["model.params"]) > 0 and int(params["data.train_samples"]) == 600
    assert params["data.val_samples"] == "300"
