"""Every config field has the bounds its meaning implies, and no value of any field gives a traceback (issue 23,
finding 8).

`train.seq_len=1000000000000`, `train.collective_timeout_s=inf` and `model.n_heads=0` were tracebacks;
`optim.lr=inf` trained nan weights and committed them with exit 0; `model.norm_eps=-1` ran until the non-finite
guard stopped it. Now a value is refused in one line naming its key before anything is built, and a shape whose
memory cannot fit this host is refused by the dry run (and at start) from the memory estimate it prints.
The fuzz walks every field of every section (nested ones too) through the CLI's own path, in process:
`--set key=value` parsing, validation, the resolved run and the dry run's description.
"""
from __future__ import annotations

import contextlib
import io
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import BaseModel

from spawn import REPO, child_env
from train_common import tiny_shards

from pretrain.cli import main as cli
from pretrain.config import Config, load_config

# What the issue tried, each once a traceback or a silently broken run.
FINDINGS = ["train.seq_len=1000000000000", "train.collective_timeout_s=inf", "train.collective_timeout_s=1e300",
            "model.dim=-8", "model.n_heads=0", "optim.lr=inf", "optim.eps=inf", "model.n_layers=0",
            "tracking.system_metrics_s=inf", "model.norm_eps=-1"]

# Typed after `--set key=`: numbers in both YAML spellings ("1e12" is a string to YAML 1.1, "1.0e+12" a float),
# infinities and nan, wrong types, a number past int64 and one past Python's 4300-digit conversion limit, and text
# that is not YAML at all.
HOSTILE = ["0", "-1", "-8", "1e12", "1.0e+12", "1e30", "1.0e+30", "1e300", "1.0e+300", "inf", ".inf", "-.inf",
           "nan", ".nan", "x", "", "[]", "{}", "true", "null", str(2**64), str(10**400), "1" * 5000, "[", "{a"]


def keys(model: type[BaseModel] = Config, prefix: str = "") -> dict[str, str]:
    """Every dotted key of the config -> its type, a nested section (train.spike) and each of its fields alike."""
    out = {}
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        if prefix:
            out[key] = str(field.annotation)
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            out.update(keys(field.annotation, f"{key}."))
    return out


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> list[str]:
    """`pretrain train --dry-run` of the debug config on the test shards, writing under a temporary directory."""
    data = tiny_shards(tmp_path_factory.mktemp("data"))
    run_dir = tmp_path_factory.mktemp("run")
    return ["train", "--config", str(REPO / "configs" / "debug.yaml"), "--dry-run",
            "--set", f"data.path={data / 'shards'}", "--set", f"checkpoint.dir={run_dir}"]


def dry_run(base: list[str], *overrides: str) -> tuple[int, str]:
    """The CLI in process: (exit code, stderr). Any exception but SystemExit escapes to the test."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = cli([*base, *(x for o in overrides for x in ("--set", o))])
    return code, err.getvalue()


def refused(code: int, err: str, key: str) -> str:
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error:"), (key, code, err[-2000:])
    assert key in lines[0], (key, lines[0])
    return lines[0]


@pytest.fixture(autouse=True)
def _no_outside_tracking(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)


@pytest.mark.parametrize("override", FINDINGS)
def test_each_finding_is_refused_in_one_line(base, override):
    key = override.split("=")[0]
    refused(*dry_run(base, override), key)


def test_a_shape_that_cannot_fit_this_host_is_refused_by_the_dry_run(base):
    """Sizes inside every field's bounds whose memory estimate is far beyond any host's RAM or GPU: the dry run
    refuses them in one line, naming the keys that set them, instead of passing them to an allocation."""
    for override, key in (("train.seq_len=1073741824", "train.seq_len"), ("model.dim=1048576", "model.dim"),
                          ("model.n_layers=50000000", "model.n_layers"),
                          ("train.micro_batch_size=100000000", "train.micro_batch_size")):
        line = refused(*dry_run(base, override), key)
        assert "the run cannot fit" in line and ("of RAM" in line or "GPU" in line), line
    assert dry_run(base) == (0, "")


def test_every_value_of_every_field_is_accepted_or_one_line_naming_it(base):
    """No hostile value of any field escapes as an exception or a traceback: it runs the dry run (exit 0) or is
    one `error:` line naming the key (exit 2)."""
    walked = keys()
    assert {"train.spike", "train.spike.window", "train.profile", "optim.lr", "model.dim"} <= set(walked)
    accepted = []
    for key in walked:
        for value in HOSTILE:
            code, err = dry_run(base, f"{key}={value}")
            if code == 0:
                accepted.append(f"{key}={value}")
            else:
                refused(code, err, key)
    # no number field takes an infinity, a nan or a number far out of any range
    numeric = {k for k, kind in walked.items() if "int" in kind or "float" in kind}
    assert {"optim.lr", "train.seq_len", "train.spike.threshold", "train.profile", "data.weights"} <= numeric
    absurd = [a for a in accepted if a.split("=", 1)[0] in numeric
              and a.split("=", 1)[1] in ("inf", ".inf", "-.inf", "nan", ".nan", "1e300", "1.0e+300", str(2**64))]
    assert absurd == [], absurd


def test_the_shipped_presets_validate():
    for preset in sorted((REPO / "configs").glob("*.yaml")):
        load_config(preset)


@pytest.mark.parametrize("override", ["train.seq_len=1000000000000", "model.n_heads=0",
                                      "train.collective_timeout_s=inf", "parallel.cp=3"])
def test_dry_run_subprocess_exits_2_with_one_line(tmp_path, override):
    shards = tiny_shards(tmp_path / "data") / "shards"
    p = subprocess.run([sys.executable, "-m", "pretrain", "train", "--config", "configs/debug.yaml", "--dry-run",
                        "--set", f"data.path={shards}", "--set", "tracking.enabled=false",
                        "--set", f"checkpoint.dir={tmp_path / 'run'}", "--set", override],
                       cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-3000:]
    assert len(p.stderr.strip().splitlines()) == 1 and override.split("=")[0] in p.stderr, p.stderr


def test_the_dry_run_refuses_a_cpu_run_that_cannot_fit_but_not_a_gpu_preset_on_a_login_node(tmp_path):
    """train.device=cpu: checked against this host's RAM. A GPU preset's dry run on a host without a GPU (README's
    `pretrain train --config configs/8b.yaml --dry-run --world-size 64` on a login node) is not judged by the login
    node's RAM: its device is not known there, and each rank checks its own at start."""
    shards = tiny_shards(tmp_path / "data") / "shards"

    def dry(config: str, world: int, *overrides: str) -> subprocess.CompletedProcess:
        sets = [x for o in (f"data.path={shards}", "tracking.enabled=false", f"checkpoint.dir={tmp_path / 'run'}",
                            *overrides) for x in ("--set", o)]
        return subprocess.run([sys.executable, "-m", "pretrain", "train", "--config", config, "--dry-run",
                               "--world-size", str(world), *sets],
                              cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=120)

    p = dry("configs/debug.yaml", 1, "train.device=cpu", "train.seq_len=100000000")
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1, p.stderr[-3000:]
    assert "the run cannot fit" in p.stderr and "of RAM (1 CPU rank)" in p.stderr, p.stderr
    p = dry("configs/8b.yaml", 64)
    assert p.returncode == 0, p.stderr[-3000:]


@pytest.mark.parametrize("override", ["optim.lr=inf", "train.seq_len=100000000"])
def test_training_refuses_before_anything_is_built(tmp_path, override):
    """`optim.lr=inf` used to train nan weights and commit them as a checkpoint, exit 0; a seq_len that cannot fit
    is refused at start by the same check as the dry run's, before any process group or run directory."""
    shards = tiny_shards(tmp_path / "data") / "shards"
    p = subprocess.run([sys.executable, "-m", "pretrain", "train", "--config", "configs/debug.yaml",
                        "--set", f"data.path={shards}", "--set", "tracking.enabled=false",
                        "--set", f"checkpoint.dir={tmp_path / 'run'}", "--set", override],
                       cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-3000:]
    assert len(p.stderr.strip().splitlines()) == 1 and override.split("=")[0] in p.stderr, p.stderr
    assert not (tmp_path / "run").exists()
