"""The spike detector's arithmetic (pretrain/spikes.py) and the `train.spike` config, without a run."""
from __future__ import annotations

import random

import pytest

from pretrain.config import ConfigError, SpikeSection, load_config
from pretrain.spikes import SpikeDetector, robust_z


def detector(**kw) -> SpikeDetector:
    return SpikeDetector(SpikeSection(enabled=True, **{"window": 8, "confirm_steps": 2, **kw}))


def feed(d: SpikeDetector, values: list[float], start: int = 1) -> list:
    return [d.observe(start + i, v, 1.0, False) for i, v in enumerate(values)]


def noisy(n: int, seed: int = 0) -> list[float]:
    rng = random.Random(seed)
    return [3.0 + rng.gauss(0, 0.02) for _ in range(n)]


def test_robust_z_ignores_an_outlier_in_the_history_and_floors_a_flat_plateau():
    assert robust_z(3.0, [1.0, 1.1, 0.9, 1.0, 100.0]) == pytest.approx(2.0 / (1.4826 * 0.1))
    assert robust_z(2.02, [2.0] * 8) == pytest.approx(1.0), "MAD 0: the spread floor is 1% of the median"


def test_confirm_steps_in_a_row_confirm_a_spike_and_name_its_first_step():
    d = detector()
    assert not any(v.suspicious for v in feed(d, noisy(12)))
    blip, calm = feed(d, [6.0, 3.0], start=13)
    assert blip.suspicious and not blip.confirmed and not calm.suspicious, "one step alone is not a spike"
    first = d.observe(15, 6.0, 1.0, False)
    assert first.suspicious and not first.confirmed and not d.calm
    second = d.observe(16, 6.1, 1.0, False)
    assert second.confirmed and second.first == 15 and d.calm
    assert max(d.losses) < 3.5, "suspicious steps never enter the history"


def test_a_periodic_checkpoint_waits_while_a_spike_is_suspected():
    d = detector(confirm_steps=3)
    feed(d, noisy(8))
    feed(d, [9.0], start=9)
    assert not d.calm
    feed(d, [3.0], start=10)
    assert d.calm


def test_nothing_is_judged_until_the_window_is_full_and_skipped_steps_are_ignored():
    d = detector()
    assert all(v.loss_z is None for v in feed(d, [9.0, 1.0, 50.0, 2.0, 3.0, 4.0, 5.0]))
    v = d.observe(8, float("nan"), float("inf"), True)
    assert v.loss_z is None and len(d.losses) == 7
    assert d.observe(9, 3.0, 1.0, False).loss_z is None and len(d.losses) == 8


def test_a_grad_norm_spike_alone_must_clear_its_own_higher_threshold():
    d = detector()
    feed(d, noisy(10))
    moderate = d.observe(11, 3.0, 1.0 + 8 * 0.01 * 1.0, False)  # MAD 0 -> floor 1% of 1.0: z = 8
    assert moderate.grad_norm_z == pytest.approx(8.0) and not moderate.suspicious, "6 < z < 12: clipped, not a spike"
    assert "loss" not in d.observe(12, 3.0, 40.0, False).why(d.cfg) and not d.calm
    off = detector(grad_norm_threshold=0)
    feed(off, noisy(10))
    assert not off.observe(11, 3.0, 40.0, False).suspicious, "grad_norm_threshold 0: the loss alone decides"
    assert d.norms[-1] == pytest.approx(1.08), "the calm step entered the history, the spike did not"


def test_the_state_round_trips():
    d = detector()
    feed(d, noisy(10))
    assert d.observe(11, 3.0, 40.0, False).suspicious
    again = detector()
    again.load_state_dict(d.state_dict())
    assert again.observe(12, 3.0, 40.0, False).confirmed == d.observe(12, 3.0, 40.0, False).confirmed is True


def test_spike_config_nested_overrides_and_one_line_errors():
    cfg = load_config(None, ["train.spike.enabled=true", "train.spike.window=16", "checkpoint.every=10"])
    assert cfg.train.spike.enabled and cfg.train.spike.window == 16 and cfg.train.spike.threshold == 6.0
    assert cfg.flat()["train.spike.window"] == 16
    with pytest.raises(ConfigError, match=r"unknown key 'train.spike.windw' \(did you mean 'window'\?\)"):
        load_config(None, ["train.spike.windw=3"])
    with pytest.raises(ConfigError, match="train.spike.enabled needs checkpoint.every > 0"):
        load_config(None, ["train.spike.enabled=true", "checkpoint.every=0"])
