"""The hot-path ring and sampler: bounded, counted, never blocking."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from server.drift.ring import SampleRing
from server.drift.sampler import DriftSampler
from tests.unit.drift.drift_kit import FakeModel, make_spec, sample


def test_a_full_ring_drops_and_counts_instead_of_overwriting() -> None:
    ring: SampleRing[int] = SampleRing(4)
    assert [ring.push(i) for i in range(6)] == [True] * 4 + [False] * 2
    assert (ring.pushed, ring.dropped, len(ring)) == (4, 2, 4)
    assert ring.drain() == [0, 1, 2, 3]  # the oldest survive: nothing was overwritten
    assert ring.push(9) and ring.drain() == [9]


def test_a_ring_holding_its_bytes_drops_and_counts() -> None:
    ring: SampleRing[str] = SampleRing(100, max_bytes=1000)
    assert [ring.push(f"s{i}", 400) for i in range(3)] == [True, True, False]
    assert ring.nbytes == 800 and ring.dropped == 1
    assert not ring.push("huge", 1001)  # larger than the whole budget: never taken
    assert ring.push("small", 200) and ring.nbytes == 1000
    assert ring.drain(limit=1) == ["s0"] and ring.nbytes == 600
    assert ring.push("again", 400)
    assert ring.drain() == ["s1", "small", "again"] and ring.nbytes == 0


def test_the_sampler_bounds_its_ring_by_the_tensors_bytes() -> None:
    sink = DriftSampler()
    # 1 KiB of input and 8 bytes of output a sample: three fit in 3.1 KiB, not four.
    model = FakeModel(make_spec(parameters={"drift_sample_rate": "1",
                                            "drift_ring_max_bytes": str(3 * 1024 + 100)}))
    sink.register(model.spec, "1").activate(frozenset({"x"}), frozenset({"label"}))
    offered = sample(model, {"x": np.zeros((1, 256), np.float32)},
                     {"label": np.zeros((1, 1), np.int64)})
    assert [sink.offer(offered) for _ in range(5)] == [True] * 3 + [False] * 2
    (version,) = sink.samplers()
    assert version.ring.nbytes == 3 * (1024 + 8) and version.ring.dropped == 2
    version.ring.drain()
    assert sink.offer(offered)


def test_drain_takes_at_most_the_limit_in_order() -> None:
    ring: SampleRing[int] = SampleRing(8)
    for i in range(5):
        ring.push(i)
    assert ring.drain(limit=2) == [0, 1]
    assert ring.drain() == [2, 3, 4]
    assert ring.drain() == []


def test_a_flood_never_blocks_the_producer() -> None:
    ring: SampleRing[int] = SampleRing(64)
    start = time.perf_counter()
    for i in range(200_000):
        ring.push(i)
    elapsed = time.perf_counter() - start
    assert ring.pushed == 64 and ring.dropped == 200_000 - 64
    assert elapsed < 2.0  # about 0.1 µs a push; generous for a loaded CI machine


def test_one_producer_one_consumer_lose_nothing_they_do_not_count() -> None:
    ring: SampleRing[int] = SampleRing(128)
    total = 200_000
    received: list[int] = []
    done = threading.Event()

    def consume() -> None:
        while not done.is_set() or len(ring):
            received.extend(ring.drain())
            time.sleep(0)

    consumer = threading.Thread(target=consume)
    consumer.start()
    for i in range(total):
        ring.push(i)
    done.set()
    consumer.join(10)
    assert ring.pushed + ring.dropped == total
    assert len(received) == ring.pushed
    assert received == sorted(received) and len(set(received)) == len(received)


def test_the_sampler_drops_and_counts_under_a_flood_without_blocking() -> None:
    sink = DriftSampler()
    model = FakeModel(make_spec(parameters={"drift_sample_rate": "1", "drift_ring_size": "16"}))
    sink.register(model.spec, "1").activate(frozenset({"x"}), frozenset({"label"}))
    offered = sample(model, {"x": np.zeros((1, 64), np.float32)},
                     {"label": np.zeros((1, 1), np.int64)})
    start = time.perf_counter()
    taken = [sink.offer(offered) for _ in range(20_000)]
    elapsed = time.perf_counter() - start
    (version,) = sink.samplers()
    assert sum(taken) == 16
    assert version.ring.pushed == 16 and version.ring.dropped == 20_000 - 16
    assert elapsed < 2.0


@pytest.mark.parametrize("rate", [0.1, 0.5])
def test_request_id_sampling_is_deterministic_and_near_the_rate(rate: float) -> None:
    params = {"drift_sample_rate": str(rate), "drift_sampling": "request_id"}
    first = DriftSampler().register(make_spec(parameters=params), "1")
    second = DriftSampler().register(make_spec(parameters=params), "1")
    ids = [f"req-{i}" for i in range(20_000)]
    chosen = [first.chosen(i) for i in ids]
    assert chosen == [second.chosen(i) for i in ids]  # every replica samples the same ones
    assert abs(sum(chosen) / len(ids) - rate) < 0.02


def test_random_sampling_is_near_the_rate() -> None:
    version = DriftSampler().register(make_spec(parameters={"drift_sample_rate": "0.1"}), "1")
    share = sum(version.chosen("") for _ in range(20_000)) / 20_000
    assert abs(share - 0.1) < 0.02


def test_samples_are_private_copies() -> None:
    sink = DriftSampler()
    model = FakeModel(make_spec())
    sink.register(model.spec, "1").activate(frozenset({"x"}), frozenset({"label"}))
    x = np.ones((1, 64), np.float32)
    label = np.ones((1, 1), np.int64)
    assert sink.offer(sample(model, {"x": x}, {"label": label}, "r1"))
    x[:] = 5
    label[:] = 5
    (taken,) = sink.samplers()[0].ring.drain()
    assert taken.request_id == "r1"
    assert (taken.inputs["x"] == 1).all() and (taken.outputs["label"] == 1).all()


def test_versions_without_a_profile_yet_count_what_they_skip() -> None:
    sink = DriftSampler()
    model = FakeModel(make_spec())
    offered = sample(model, {"x": np.zeros((1, 64), np.float32)},
                     {"label": np.zeros((1, 1), np.int64)})
    assert not sink.offer(offered)  # registered on first sight, not active yet
    (version,) = sink.samplers()
    assert version.unprofiled == 1 and version.ring.pushed == 0


def test_models_without_drift_are_skipped_and_not_listed() -> None:
    sink = DriftSampler()
    model = FakeModel(make_spec(parameters={}))
    assert not sink.offer(sample(model, {"x": np.zeros((1, 64), np.float32)}, {}))
    assert sink.samplers() == []


def test_a_reloaded_spec_registers_again() -> None:
    sink = DriftSampler()
    first = sink.register(make_spec(), "1")
    assert sink.register(first.spec, "1") is first
    second = sink.register(make_spec(parameters={"drift_sample_rate": "0.5"}), "1")
    assert second is not first
    assert sink.samplers() == [second]
