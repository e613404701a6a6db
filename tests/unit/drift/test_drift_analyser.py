"""Windows, the sample store and the analyser thread, without a server."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from server.drift import features
from server.drift import options as drift_config
from server.drift import profile as profiles
from server.drift.analyser import DriftAnalyser
from server.drift.sampler import CapturedSample, DriftSampler
from server.drift.store import SampleStore, read_windows, to_block
from server.drift.window import Block, Windows, assemble
from server.metrics.drift import DriftMetrics
from server.spec import TensorSpec
from server.types import DataType
from tests.unit.drift.drift_kit import FakeModel, make_profile, make_spec, sample


def rows_block(start: int, count: int) -> Block:
    ids = np.asarray([str(i) for i in range(start, start + count)], dtype=object)
    return Block(count, ids, {"x": np.arange(start, start + count, dtype=np.float64)[:, None]})


def test_fixed_windows_are_exact_and_the_sliding_window_keeps_the_newest() -> None:
    windows = Windows(10)
    assert windows.add(rows_block(0, 7)) == []
    done = windows.add(rows_block(7, 25))
    assert [w.request_ids.tolist() for w in done] == [
        [str(i) for i in range(0, 10)], [str(i) for i in range(10, 20)],
        [str(i) for i in range(20, 30)],
    ]
    assert windows.sliding.request_ids.tolist() == [str(i) for i in range(22, 32)]
    assert windows.flush().request_ids.tolist() == ["30", "31"]
    assert windows.total_rows == 32


def test_assembly_keeps_rows_aligned_and_marks_absent_outputs() -> None:
    spec = make_spec(inputs=(TensorSpec("x", DataType.FP32, (2,)),),
                     outputs=(TensorSpec("label", DataType.INT64, (1,)),))
    layouts = features.layouts(spec, drift_config.parse(spec.parameters, spec.name))
    samples = [
        CapturedSample("a", {"x": np.ones((2, 2), np.float32)},
                       {"label": np.array([[1], [2]])}),
        CapturedSample("b", {"x": np.zeros((1, 2), np.float32)}, {}),  # label not requested
        CapturedSample("c", {"x": np.ones((1, 3), np.float32)},  # wrong width
                       {"label": np.array([[3]])}),
    ]
    assembly = assemble(samples, layouts, {"x": 2, "label": 1})
    block = assembly.block
    assert block.rows == 4 and block.request_ids.tolist() == ["a", "a", "b", "c"]
    assert block.present["label"].tolist() == [True, True, False, True]
    assert block.present["x"].tolist() == [True, True, True, False]
    assert block.values["label"][:, 0].tolist() == ["1", "2", None, "3"]
    assert assembly.mismatched == 1


@pytest.mark.parametrize("fmt", ["npz", "parquet"])
def test_the_store_round_trips_and_stays_under_its_cap(
    tmp_path: Path, rng: np.random.Generator, fmt: str,
) -> None:
    if fmt == "parquet":
        pytest.importorskip("pyarrow")
    spec = make_spec(inputs=(TensorSpec("x", DataType.FP32, (3,)),
                             TensorSpec("city", DataType.BYTES, (1,))))
    profile = make_profile(spec, {
        "x": rng.normal(size=(100, 3)),
        "city": np.asarray([b"a", b"b"], dtype=object)[rng.integers(0, 2, (100, 1))],
        "label": rng.integers(0, 3, (100, 1)),
    })
    block = Block(
        4, np.asarray(["r1", "r2", "r3", "r4"], dtype=object),
        {"x": rng.normal(size=(4, 3)),
         "city": np.asarray([["a"], ["b"], ["zz"], ["a"]], dtype=object),
         "label": np.asarray([["1"], [None], ["2"], ["0"]], dtype=object)},
        {"label": np.array([True, False, True, True])},
    )
    store = SampleStore(tmp_path, max_bytes=10**9, fmt=fmt)
    path = store.write(block, profile, {"score": 0.5, "level": "ok"})
    assert path is not None and path.name == f"window-00000000.{fmt}"
    (stored,) = read_windows(tmp_path)
    assert stored.meta["score"] == 0.5 and stored.meta["rows"] == 4
    back = to_block(stored.columns, profile)
    assert back.request_ids.tolist() == ["r1", "r2", "r3", "r4"]
    assert np.allclose(back.values["x"], block.values["x"])
    assert back.values["city"][:, 0].tolist() == ["a", "b", "zz", "a"]
    assert back.values["label"][:, 0].tolist() == ["1", None, "2", "0"]
    assert back.present["label"].tolist() == [True, False, True, True]

    one = path.stat().st_size
    capped = SampleStore(tmp_path, max_bytes=int(one * 3.5), fmt=fmt)
    for _ in range(10):
        capped.write(block, profile, {})
    left = read_windows(tmp_path)
    assert [w.sequence for w in left] == [8, 9, 10]  # numbering continues; oldest went first
    assert sum(w.path.stat().st_size for w in left) <= one * 3.5
    assert SampleStore(tmp_path, max_bytes=0).write(block, profile, {}) is None


class Gauges:
    def __init__(self) -> None:
        self.features: dict[tuple[str, str], dict[str, Any]] = {}
        self.models: dict[str, dict[str, Any]] = {}

    def set_feature(self, model: str, version: str, window: str, feature: str,
                    **values: Any) -> None:
        self.features[(window, feature)] = values

    def set_model(self, model: str, version: str, window: str, **values: Any) -> None:
        self.models[window] = values


def test_the_analyser_from_samples_to_gauges_logs_and_store(
    tmp_path: Path, rng: np.random.Generator, caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    params = {"drift_sample_rate": "1", "drift_window": "200"}
    spec = make_spec(inputs=(TensorSpec("x", DataType.FP32, (8,)),), parameters=params)
    model = FakeModel(spec)
    sink = DriftSampler()
    gauges = Gauges()
    analyser = DriftAnalyser(sink, tmp_path, gauges, sliding_every=0.0)

    def send(count: int, shift: float) -> None:
        for i in range(count):
            x = rng.normal(size=(1, 8)).astype(np.float32)
            x[0, 3] += shift
            sink.offer(sample(model, {"x": x}, {"label": rng.integers(0, 3, (1, 1))}, f"r{i}"))

    send(5, 0.0)  # before any profile: counted, not kept
    analyser.run_once(now=0.0)
    assert any(r.message == "drift sampling waits for a reference profile"
               for r in caplog.records)
    (version,) = sink.samplers()
    assert version.unprofiled == 5 and not version.active

    reference = {"x": rng.normal(size=(5000, 8)), "label": rng.integers(0, 3, (5000, 1))}
    profiles.save(make_profile(spec, reference), profiles.profile_path(tmp_path, "m", "1"))
    analyser.run_once(now=5.0)
    assert not version.active  # the next look at the disk is after the retry delay
    analyser.run_once(now=11.0)
    assert version.active

    send(120, 0.0)  # over drift_min_rows (half a window): the sliding window is evaluated
    reports = analyser.run_once(now=12.0)
    assert [(r.window, r.rows) for r in reports] == [("sliding", 120)]
    send(80, 0.0)  # the first fixed window closes; it stands in for the sliding one
    reports = analyser.run_once(now=12.5)
    assert [(r.window, r.rows) for r in reports] == [("fixed", 200)]
    assert reports[0].level.label == "ok"
    assert gauges.models["sliding"]["rows"] == 200
    send(200, 1.5)
    reports = analyser.run_once(now=13.0)
    assert [r.window for r in reports] == ["fixed"]
    assert reports[0].level.label == "alert"
    assert gauges.models["sliding"]["level"] == 2
    assert reports[0].worst(1)[0].feature == "x[3]"
    assert gauges.models["fixed"]["level"] == 2
    assert gauges.features[("fixed", "x[3]")]["psi"] > 0.25
    assert gauges.features[("fixed", "x[0]")]["level"] == 0
    assert np.isnan(gauges.features[("fixed", "label")]["ks_pvalue"])
    changed = [r for r in caplog.records if r.message == "drift level changed"]
    assert len(changed) == 1 and "x[3]" in changed[0].features  # type: ignore[attr-defined]

    send(50, 0.0)
    analyser.start()
    analyser.stop()  # a last pass, then the partial window goes to the store
    stored = read_windows(tmp_path / ".drift" / "m" / "1")
    assert [w.meta["rows"] for w in stored] == [200, 200, 50]
    assert [w.meta["partial"] for w in stored] == [False, False, True]
    assert {r.window for r in analyser.reports()} == {"fixed", "sliding"}


def test_a_failing_version_does_not_stop_the_others(
    tmp_path: Path, rng: np.random.Generator, caplog: pytest.LogCaptureFixture,
) -> None:
    sink = DriftSampler()
    good = FakeModel(make_spec(name="good"))
    bad = FakeModel(make_spec(name="bad"))
    sink.register(good.spec, "1")
    sink.register(bad.spec, "1")
    reference = {"x": rng.normal(size=(500, 64)), "label": rng.integers(0, 3, (500, 1))}
    profiles.save(make_profile(good.spec, reference), profiles.profile_path(tmp_path, "good", "1"))
    broken = profiles.profile_path(tmp_path, "bad", "1")
    broken.parent.mkdir(parents=True)
    broken.write_text("{not json")
    analyser = DriftAnalyser(sink, tmp_path)
    analyser.run_once(now=0.0)
    analyser.run_once(now=100.0)
    active = {s.model: s.active for s in sink.samplers()}
    assert active == {"good": True, "bad": False}
    failures = [r for r in caplog.records if r.message == "drift analysis failed"]
    assert len(failures) == 1  # the same error is logged once, not on every pass


def test_a_version_no_longer_served_loses_its_sampler_and_its_gauges(
    tmp_path: Path, rng: np.random.Generator,
) -> None:
    registry = CollectorRegistry()
    spec = make_spec(parameters={"drift_sample_rate": "1", "drift_window": "20"})
    sink = DriftSampler()
    analyser = DriftAnalyser(sink, tmp_path, DriftMetrics(registry), sliding_every=0.0)
    reference = {"x": rng.normal(size=(500, 64)), "label": rng.integers(0, 3, (500, 1))}
    models = {v: FakeModel(spec, v) for v in ("1", "2")}
    for version, model in models.items():
        sink.register(model.spec, version)
        profiles.save(make_profile(spec, reference, version),
                      profiles.profile_path(tmp_path, "m", version))
    analyser.run_once(now=0.0)

    def offer(version: str) -> bool:
        return sink.offer(sample(models[version], {"x": rng.normal(size=(1, 64))},
                                 {"label": rng.integers(0, 3, (1, 1))}))

    for _ in range(20):
        offer("1")
        offer("2")
    analyser.run_once(now=1.0)

    def series(version: str) -> int:
        return sum(1 for family in registry.collect() for s in family.samples
                   if s.labels.get("version") == version and s.labels.get("model") == "m")

    assert series("1") > 0 and series("1") == series("2")
    sink.retain(frozenset({("m", "2")}))  # version 1 was unloaded
    analyser.run_once(now=2.0)
    assert series("1") == 0 and series("2") > 0
    # A request of version 1 still in flight at the unload does not bring it back.
    assert not offer("1")
    assert [s.version for s in sink.samplers()] == ["2"]


def test_an_output_answered_as_classes_is_not_sampled(rng: np.random.Generator) -> None:
    """Triton's classification extension turns an output into strings: the sample leaves it
    out (the window marks it absent), as an output the client did not ask for."""
    model = FakeModel(make_spec(inputs=(TensorSpec("x", DataType.FP32, (8,)),)))
    sink = DriftSampler()
    version = sink.register(model.spec, "1")
    version.activate(frozenset({"x"}), frozenset({"label"}))
    x = rng.normal(size=(1, 8)).astype(np.float32)
    plain = sample(model, {"x": x}, {"label": np.array([[2]])})
    classified = sample(model, {"x": x}, {"label": np.array([[2]])})
    classified.request.classification = {"label": 1}
    assert sink.offer(plain) and sink.offer(classified)
    assert [sorted(s.outputs) for s in version.ring.drain()] == [["label"], []]
