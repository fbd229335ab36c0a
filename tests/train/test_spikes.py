"""The spike detector's arithmetic (pretrain/train/spikes.py) and the `train.spike` config, without a run."""
from __future__ import annotations

import random

import pytest

from pretrain.config import ConfigError, SpikeSection, load_config
from pretrain.train.spikes import SpikeDetector, robust_z


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


def test_nothing_is_judged_before_eight_calm_steps_and_skipped_steps_are_ignored():
    d = detector()
    assert all(v.loss_z is None for v in feed(d, [9.0, 1.0, 50.0, 2.0, 3.0, 4.0, 5.0]))
    v = d.observe(8, float("nan"), float("inf"), True)
    assert v.loss_z is None and len(d.losses) == 7
    assert d.observe(9, 3.0, 1.0, False).loss_z is None and len(d.losses) == 8


# configs/debug.yaml on the demo corpus (pretrain/demo.py's shards), its first 40 clean steps, rounded: the loss
# falls fast, and the grad norm jumps 4x at step 12 with nothing wrong.
DEBUG_LOSS = [6.95, 6.91, 6.88, 6.84, 6.78, 6.71, 6.64, 6.59, 6.53, 6.44, 6.34, 6.25, 6.13, 5.98, 5.87, 5.79, 5.62,
              5.52, 5.39, 5.25, 5.14, 4.98, 4.85, 4.71, 4.63, 4.49, 4.35, 4.28, 4.16, 4.01, 3.87, 3.79, 3.77, 3.61,
              3.51, 3.42, 3.36, 3.26, 3.19, 3.09]
DEBUG_NORM = [0.97, 0.94, 0.98, 1.13, 1.05, 1.09, 1.15, 1.18, 1.2, 1.3, 2.41, 4.16, 1.17, 1.21, 1.6, 1.17, 1.35, 1.5,
              1.22, 1.32, 1.15, 1.41, 1.17, 1.24, 1.07, 2.18, 1.01, 1.12, 0.93, 0.99, 1.04, 0.93, 0.93, 0.96, 0.95,
              0.84, 0.83, 0.81, 0.92, 0.75]


def test_the_first_window_is_judged_against_its_most_recent_steps_without_false_alarms():
    d = detector(window=100, confirm_steps=3)
    clean = [d.observe(i, loss, norm, False) for i, (loss, norm) in enumerate(zip(DEBUG_LOSS, DEBUG_NORM), 1)]
    assert [v.loss_z is None for v in clean] == [True] * 8 + [False] * 32, "judged from the 9th step on"
    assert not any(v.suspicious for v in clean) and max(v.loss_z for v in clean[8:]) < 0, "a falling curve is calm"
    assert max(v.grad_norm_z for v in clean[8:]) > d.cfg.grad_norm_threshold, \
        "the grad norm's jump is reported but not judged before the window is full"
    # A poisoned stretch at step 41: far above the last steps' loss, though below the lagging median of all 40.
    junk = [d.observe(41 + i, 5.5, 1.0, False) for i in range(3)]
    assert all(v.suspicious for v in junk) and junk[-1].confirmed and junk[-1].first == 41
    assert robust_z(5.5, DEBUG_LOSS) < d.cfg.threshold


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
