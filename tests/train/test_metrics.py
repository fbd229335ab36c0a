"""The per-step record: MFU arithmetic, full-precision jsonl, and no duplicate steps after a resume."""
from __future__ import annotations

import json

from pretrain import metrics
from pretrain.model.args import FLAVORS


def test_palm_flops_per_token_for_llama2_7b():
    # LLaMA-2 7B, T=4096: N_non_emb = 6.476e9 -> 6N = 3.886e10; 12*L*H*Q*T = 12*32*32*128*4096 = 6.44e9
    args = FLAVORS["7b"]
    fpt = metrics.flops_per_token(args, 4096, 32000)
    assert fpt == 6 * args.num_params(32000, embeddings=False) + 12 * 32 * 32 * 128 * 4096
    assert 4.5e10 < fpt < 4.6e10  # 3.886e10 + 6.44e9


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
    with open(tmp_path / metrics.METRICS_FILE, "a") as fh:
        fh.write('{"step": 6, "lo')  # a killed run's half line
    assert [r["loss"] for r in metrics.read_lines(tmp_path, 5)][3] == "nan", "a NaN loss stays visible"
    assert metrics.truncate_after(tmp_path, 3) == 3
    recs = metrics.read(tmp_path)
    assert [r["step"] for r in recs] == [1, 2, 3]
    assert [r["loss"] for r in recs] == losses[:3], "floats must round-trip bit-exactly"
