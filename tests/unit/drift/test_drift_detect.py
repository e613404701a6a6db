"""The detectors on synthetic streams: false alarms, a small mean shift, unseen categories,
prediction drift and missing values."""

from __future__ import annotations

import numpy as np

from server.drift import features
from server.drift import options as drift_config
from server.drift.detect import Level, evaluate
from server.drift.options import Thresholds
from server.drift.profile import ReferenceProfile
from server.drift.window import Block, Windows
from server.spec import TensorSpec
from server.types import DataType
from tests.unit.drift.drift_kit import make_profile, make_spec

FEATURES = 64


def block(values: dict[str, np.ndarray]) -> Block:
    rows = next(iter(values.values())).shape[0]
    return Block(rows, np.asarray([""] * rows, dtype=object), values)


def numeric_profile(rng: np.random.Generator) -> ReferenceProfile:
    """64 standard normal input features and one uniform score output."""
    spec = make_spec(outputs=(TensorSpec("score", DataType.FP32, (1,)),))
    reference = rng.normal(size=(20_000, FEATURES))
    return make_profile(spec, {"x": reference, "score": rng.random((20_000, 1))})


def test_no_drift_keeps_the_window_alert_rate_below_the_false_alarm_level(
    rng: np.random.Generator,
) -> None:
    profile = numeric_profile(rng)
    level = 0.05
    thresholds = Thresholds(ks_alert=level)
    windows = 200
    alerts = 0
    for _ in range(windows):
        live = {"x": rng.normal(size=(500, FEATURES)), "score": rng.random((500, 1))}
        report = evaluate(profile, block(live), thresholds, "fixed")
        alerts += report.level is Level.ALERT
    print(f"{alerts} of {windows} windows without drift alerted (level {level})")
    assert alerts / windows <= level, f"{alerts} of {windows} windows alerted"


def test_a_half_sigma_shift_in_one_of_64_features_is_flagged_on_it_alone(
    rng: np.random.Generator,
) -> None:
    profile = numeric_profile(rng)
    shifted = 17
    for _ in range(5):  # five independent streams of 2,000 rows, in fixed windows of 1,000
        windows = Windows(1000)
        stream = rng.normal(size=(2000, FEATURES))
        stream[:, shifted] += 0.5
        completed = windows.add(block({"x": stream, "score": rng.random((2000, 1))}))
        assert len(completed) == 2
        for window in completed:
            report = evaluate(profile, window, Thresholds(), "fixed")
            flagged = {f.feature for f in report.features if f.level is Level.ALERT}
            assert flagged == {f"x[{shifted}]"}
            assert report.level is Level.ALERT
            assert report.worst(1)[0].feature == f"x[{shifted}]"
            quiet = [f for f in report.features if f.feature != f"x[{shifted}]"]
            assert all(f.level is Level.OK for f in quiet)


def test_a_category_the_reference_never_saw_is_flagged(rng: np.random.Generator) -> None:
    spec = make_spec(inputs=(TensorSpec("city", DataType.BYTES, (1,)),))
    cities = np.array([b"paris", b"lyon", b"nice"], dtype=object)
    reference = cities[rng.integers(0, 3, (5000, 1))]
    profile = make_profile(spec, {"city": reference, "label": rng.integers(0, 2, (5000, 1))})
    layout = features.layouts(spec, drift_config.parse(spec.parameters, spec.name))[0]

    live = cities[rng.integers(0, 3, (1000, 1))]
    live[:80, 0] = b"brest"  # 8 %: above drift_range_alert
    report = evaluate(profile, block({
        "city": layout.matrix(live),
        "label": features.layouts(spec, drift_config.parse(spec.parameters, spec.name))[1].matrix(
            rng.integers(0, 2, (1000, 1))),
    }), Thresholds(), "fixed")
    city = next(f for f in report.features if f.feature == "city")
    assert city.level is Level.ALERT
    assert city.out_of_range == 0.08
    assert any("unseen" in r for r in city.reasons)

    live = cities[rng.integers(0, 3, (1000, 1))]
    live[0, 0] = b"brest"  # one stray value: a warning, not an alert
    report = evaluate(profile, block({"city": layout.matrix(live)}), Thresholds(),
                      "fixed")
    assert report.features[0].level is Level.WARNING


def test_prediction_drift_is_flagged_when_the_class_mix_changes(
    rng: np.random.Generator,
) -> None:
    spec = make_spec(inputs=(TensorSpec("x", DataType.FP32, (4,)),),
                     outputs=(TensorSpec("label", DataType.INT64, (1,)),))
    reference = {"x": rng.normal(size=(10_000, 4)), "label": rng.integers(0, 10, (10_000, 1))}
    profile = make_profile(spec, reference)
    label_layout = features.layouts(spec, drift_config.parse(spec.parameters, spec.name))[1]

    same = {"x": rng.normal(size=(1000, 4)),
            "label": label_layout.matrix(rng.integers(0, 10, (1000, 1)))}
    assert evaluate(profile, block(same), Thresholds(), "fixed").level is Level.OK

    mix = np.full(10, 0.05)
    mix[3] = 0.55  # class 3 now takes over half of the predictions
    labels = rng.choice(10, size=(1000, 1), p=mix)
    changed = {"x": rng.normal(size=(1000, 4)), "label": label_layout.matrix(labels)}
    report = evaluate(profile, block(changed), Thresholds(), "fixed")
    label = next(f for f in report.features if f.feature == "label")
    assert label.level is Level.ALERT
    assert label.js > 0.2
    assert all(f.level is Level.OK for f in report.features if f.feature != "label")


def test_a_rise_in_missing_values_is_flagged(rng: np.random.Generator) -> None:
    profile = numeric_profile(rng)
    live = rng.normal(size=(1000, FEATURES))
    live[:100, 5] = np.nan
    report = evaluate(profile, block({"x": live}), Thresholds(), "fixed")
    feature = next(f for f in report.features if f.feature == "x[5]")
    assert feature.level is Level.ALERT
    assert feature.missing_rate == 0.1
    assert any("missing" in r for r in feature.reasons)
