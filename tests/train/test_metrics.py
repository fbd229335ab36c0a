"""The per-step record: MFU arithmetic, full-precision jsonl, no duplicate steps after a resume, z-loss's metric."""
from __future__ import annotations

import json
import math

import pytest

from train_common import run_python, tiny_shards, train_args

from pretrain.telemetry import metrics
from pretrain.telemetry.tracking import step_values
from pretrain.run.paths import METRICS_FILE
from pretrain.model.args import FLAVORS
from pretrain.model.flops import flops_per_token, matmul_params


def test_flops_per_token_of_7b_and_8b_pinned_to_hand_computed_values():
    """PaLM's 6N + 12LHQT with the output head in N (the headline MFU), and Megatron's causal 6N + 6LHQT.

    LLaMA-2 7B, V=32000, T=4096: a block holds 4*4096^2 (attention) + 3*4096*11008 (SwiGLU) + 2*4096 (norms)
    = 202,383,360 weights; 32 blocks + final norm 4096 + head 32000*4096 = 131,072,000 -> N = 6,607,343,616;
    6N = 39,644,061,696; 12*32*32*128*4096 = 6,442,450,944 -> 46,086,512,640 FLOPs per token.
    LLaMA-3 8B, V=128256, T=8192: a block holds 2*4096^2 + 2*4096*1024 (GQA k/v) + 3*4096*14336 + 8192
    = 218,112,000; 32 blocks + 4096 + head 128256*4096 = 525,336,576 -> N = 7,504,924,672;
    6N = 45,029,548,032; 12*32*32*128*8192 = 12,884,901,888 -> 57,914,449,920.
    """
    assert flops_per_token(FLAVORS["7b"], 4096, 32000) == 46_086_512_640
    assert flops_per_token(FLAVORS["8b"], 8192, 128256) == 57_914_449_920
    # Megatron's convention halves attention for the causal mask: 39,644,061,696 + 3,221,225,472.
    assert flops_per_token(FLAVORS["7b"], 4096, 32000, causal=True) == 42_865_287_168
    assert flops_per_token(FLAVORS["8b"], 8192, 128256, causal=True) == 45_029_548_032 + 6_442_450_944
    # Tied embeddings (1b): the head matmul still runs, so it is still counted.
    tied = FLAVORS["1b"]
    assert matmul_params(tied, 128256) == tied.num_params(128256)  # the one V x D table, as the head


def test_mfu_is_achieved_over_peak_and_null_without_peak():
    m = metrics.Meter(flops_per_token=1e9, tokens_per_step=1000, world_size=2, peak_tflops=100.0)
    rec = m.record(1, 2.0, 1e-3, 0.5, False)
    assert abs(rec.tflops - rec.tokens_per_s * 1e9 / 2 / 1e12) < 1e-12
    assert abs(rec.mfu - rec.tflops / 100.0) < 1e-15
    cpu = metrics.Meter(flops_per_token=1e9, tokens_per_step=1000, world_size=1, peak_tflops=None)
    assert json.loads(cpu.record(1, 2.0, 1e-3, 0.5, False).to_json())["mfu"] is None


def test_jsonl_round_trips_floats_exactly_and_truncates_on_resume(tmp_path):
    f = metrics.MetricsFile(tmp_path)
    m = metrics.Meter(flops_per_token=1.0, tokens_per_step=8, world_size=1, peak_tflops=None)
    losses = [10.123456789012345, 9.87654321098765, 1 / 3, float("nan"), 2 ** -40]
    for step, loss in enumerate(losses, 1):
        f.append(m.record(step, loss, 0.1, 1.0, loss != loss))
    f.close()
    with open(tmp_path / METRICS_FILE, "a") as fh:
        fh.write('{"step": 6, "lo')  # a killed run's half line
    first = [json.loads(line) for line in (tmp_path / METRICS_FILE).read_text().splitlines()[:5]]
    assert first[3]["loss"] == "nan", "a NaN loss stays visible"
    assert metrics.truncate_after(tmp_path, 3) == 3
    recs = metrics.read(tmp_path)
    assert [r["step"] for r in recs] == [1, 2, 3]
    assert [r["loss"] for r in recs] == losses[:3], "floats must round-trip bit-exactly"


def test_z_loss_is_a_metric_of_its_own_only_when_on():
    m = metrics.Meter(flops_per_token=1.0, tokens_per_step=8, world_size=1, peak_tflops=None)
    plain = m.record(1, 2.0, 1e-3, 0.5, False)
    assert json.loads(plain.to_json())["z_loss"] is None and "z_loss" not in plain.line()
    assert "z_loss" not in step_values(json.loads(plain.to_json()))
    rec = m.record(2, 2.0, 1e-3, 0.5, False)
    rec.z_loss = 1.25e-3
    assert json.loads(rec.to_json())["z_loss"] == 1.25e-3 and "| z_loss 1.250e-03 |" in rec.line()
    assert step_values(json.loads(rec.to_json()))["z_loss"] == 1.25e-3


@pytest.mark.slow
def test_z_loss_run_logs_the_term_in_metrics_jsonl_and_mlflow_beside_the_cross_entropy(tmp_path):
    """A run with train.z_loss: every step's record holds `z_loss` (coef x mean lse^2 > 0), the step line shows it,
    MLflow has it at every step; `loss` stays the cross-entropy, on the curve of a run without z-loss (z-loss only
    moves the weights a little over 3 steps: the first step's loss, before any update, is the same to rounding)."""
    import mlflow

    shards = tiny_shards(tmp_path / "data") / "shards"
    runs = {}
    for name, coef in (("plain", 0.0), ("z", 1e-3)):
        run = tmp_path / name
        p = run_python(train_args(shards, run, "train.max_steps=3", f"train.z_loss={coef}",
                                  f"tracking.enabled={coef > 0}", "tracking.system_metrics_s=0"))
        assert p.returncode == 0, p.stderr[-3000:]
        runs[name] = (metrics.read(run), p.stdout)
    (plain, _), (z, out) = runs["plain"], runs["z"]
    assert all(r["z_loss"] is None for r in plain)
    assert all(math.isfinite(r["z_loss"]) and r["z_loss"] > 0 for r in z) and "| z_loss " in out
    assert z[0]["loss"] == pytest.approx(plain[0]["loss"], rel=1e-6)
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'z' / 'mlruns' / 'mlflow.db'}")
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "z_loss"))
    assert history == [(r["step"], r["z_loss"]) for r in z]
    assert run.data.params["train.z_loss"] == "0.001"
