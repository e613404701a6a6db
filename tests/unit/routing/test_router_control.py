"""server.routing.router.Router without a server: routing decisions and table control."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from server.errors import BackendError, InvalidInput
from server.metrics.routing import RoutingMetrics
from server.routing import router as router_module
from server.routing.router import Router
from server.routing.shadow import ShadowMirror
from server.routing.splitter import pick_sticky
from server.routing.store import RouteStore
from server.routing.table import Canary, RouteTable, Variant
from server.types import DataType, InferRequest, InferResponse, OutputTensor, RouteDecision
from tests.unit.routing.test_route_table import lookup


class FailingStore(RouteStore):
    fail = False

    def write(self, table: RouteTable) -> None:
        if self.fail:
            raise OSError("disk full")
        super().write(table)

    def remove(self, model: str) -> None:
        if self.fail:
            raise OSError("read-only")
        super().remove(model)


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
async def router(tmp_path: Path, registry: CollectorRegistry) -> Any:
    for model in ("m", "twin"):
        (tmp_path / model).mkdir()
    metrics = RoutingMetrics(registry)
    made = Router(lookup, metrics, ShadowMirror(metrics),
                  FailingStore(lambda model: tmp_path / model), rng=random.Random(5))
    yield made
    await made.close()


def request(version: str = "", **parameters: Any) -> InferRequest:
    return InferRequest(model_name="m", model_version=version, id="",
                        inputs={"INPUT0": np.zeros((1, 16), np.float32)},
                        input_types={"INPUT0": DataType.FP32}, parameters=parameters)


def served() -> InferResponse:
    return InferResponse(model_name="m", model_version="2", id="", outputs=[
        OutputTensor("OUTPUT0", DataType.FP32, np.zeros((1, 16), np.float32))])


def table(*weights: float, **fields: Any) -> RouteTable:
    names = "abc"
    return RouteTable(model="m", variants=tuple(
        Variant(name=names[i], version=str(i + 1), weight=w) for i, w in enumerate(weights)
    ), **fields)


def gauge(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    value: float | None = registry.get_sample_value(name, labels)
    return value


async def test_no_table_or_an_explicit_version_is_not_routed(router: Router) -> None:
    assert router.route(request()) is None
    router.set_table(table(50, 50), "t")
    assert router.route(request(version="1")) is None
    decision = router.route(request())
    assert decision is not None and decision.route_model == "m"
    assert (decision.variant, decision.version) in {("a", "1"), ("b", "2")}
    assert not decision.mirror


async def test_sticky_parameter_and_weighted_random(router: Router) -> None:
    router.set_table(table(30, 70, sticky_parameter="user"), "t")
    for key in ("u1", "u2", "u3", "u4"):
        decision = router.route(request(user=key))
        assert decision is not None
        assert decision.variant == "ab"[pick_sticky(key, ("a", "b"), (30, 70))]
    # An empty key is no key.
    assert {router.route(request(user="")).variant for _ in range(50)} == {"a", "b"}  # type: ignore[union-attr]


async def test_a_table_that_cannot_be_persisted_applies_in_memory_and_says_so(
    router: Router, tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    store = router._store
    assert isinstance(store, FailingStore)
    store.fail = True
    status = router.set_table(table(0, 100), "t")
    assert [v.weight for v in status.table.variants] == [0, 100]
    assert "not persisted" in status.persist_error and "disk full" in status.persist_error
    assert router.route(request()).variant == "b"  # type: ignore[union-attr]
    assert not (tmp_path / "m" / "routing.json").exists()
    logged = [r for r in caplog.records if r.getMessage() == "routing change not persisted"]
    assert logged and logged[-1].levelname == "ERROR"
    # A later write that succeeds brings memory and disk together again.
    store.fail = False
    assert router.set_table(table(50, 50), "t").persist_error == ""
    assert (tmp_path / "m" / "routing.json").exists()
    # A clear that cannot remove the file clears in memory and says the file stays.
    store.fail = True
    cleared = router.clear("m", "t")
    assert "read-only" in cleared.persist_error and router.routes() == []
    assert router.route(request()) is None
    assert (tmp_path / "m" / "routing.json").exists()


async def test_a_canary_rolls_back_in_memory_when_the_store_fails(
    router: Router, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(router_module, "CANARY_TICK_SECS", 0.01)
    store = router._store
    assert isinstance(store, FailingStore)
    store.fail = True
    status = router.set_table(table(100, 0, canary=Canary(
        baseline="a", candidate="b", steps=(50, 100), step_interval_secs=3600,
        min_requests=5)), "t")
    assert status.canary_state == "running" and status.persist_error
    for _ in range(10):
        decision = RouteDecision("m", "b", "m", "2")
        router.finish(decision, request(), BackendError("crashed"), 0.001)
    for _ in range(100):
        if router.status("m").canary_state != "running":
            break
        await asyncio.sleep(0.01)
    status = router.status("m")
    assert status.canary_state == "rolled_back" and "error rate" in status.canary_reason
    assert [v.weight for v in status.table.variants] == [100, 0]
    assert {router.route(request()).variant for _ in range(20)} == {"a"}  # type: ignore[union-attr]
    assert "not persisted" in status.persist_error


async def test_bad_requests_to_the_candidate_never_roll_it_back(
    router: Router, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(router_module, "CANARY_TICK_SECS", 0.01)
    router.set_table(table(100, 0, canary=Canary(
        baseline="a", candidate="b", steps=(50, 100), step_interval_secs=0.05,
        min_requests=5)), "t")
    candidate = RouteDecision("m", "b", "m", "2")
    for _ in range(200):
        router.finish(candidate, request(), InvalidInput("wrong shape"), 0.001)
    await asyncio.sleep(0.2)
    status = router.status("m")
    # Refused requests are not judged: the candidate has served none yet.
    assert status.canary_state == "running"
    assert {v.name: v.requests for v in status.variants}["b"] == 0
    for _ in range(5):
        router.finish(candidate, request(), served(), 0.001)
    for _ in range(100):
        if router.status("m").canary_step == 1:
            break
        await asyncio.sleep(0.01)
    assert router.status("m").canary_step == 1


async def test_a_verdict_for_a_variant_since_removed_is_dropped(
    router: Router, registry: CollectorRegistry,
) -> None:
    router.set_table(table(50, 50), "t")
    router.set_table(table(100), "t")
    router.finish(RouteDecision("m", "b", "m", "2"), request(), served(), 0.001)
    assert gauge(registry, "peregrine_route_requests_total", model="m", variant="b") is None
    assert [v.name for v in router.status("m").variants] == ["a"]


async def test_weight_and_canary_gauges_follow_the_table(
    router: Router, registry: CollectorRegistry,
) -> None:
    router.set_table(table(20, 30, 50), "t")
    assert gauge(registry, "peregrine_route_weight", model="m", variant="c") == 50
    router.set_table(table(60, 40), "t")
    assert gauge(registry, "peregrine_route_weight", model="m", variant="a") == 60
    assert gauge(registry, "peregrine_route_weight", model="m", variant="c") is None
    router.set_table(table(100, 0, canary=Canary(baseline="a", candidate="b",
                                                       steps=(25, 100))), "t")
    assert gauge(registry, "peregrine_canary_weight_percent", model="m") == 25
    router.set_table(table(60, 40), "t")  # replaces the running canary
    assert gauge(registry, "peregrine_canary_weight_percent", model="m") is None
    router.clear("m", "t")
    assert gauge(registry, "peregrine_route_weight", model="m", variant="a") is None


async def test_routing_files_are_loaded_and_bad_ones_keep_the_old_table(
    router: Router, tmp_path: Path,
) -> None:
    path = tmp_path / "m" / "routing.json"
    path.write_text('{"variants": [{"name": "a", "version": "1", "weight": 1}]}')
    router.load_persisted(["m", "twin"])
    assert router.routes() == ["m"]
    path.write_text('{"variants": [{"name": "a", "version": "8", "weight": 1}]}')
    router.load_persisted(["m", "twin"])
    assert router.status("m").table.variants[0].version == "1"
    router.load_persisted(["m", "twin"])  # unchanged since: not read again
    path.unlink()
    router.load_persisted(["m", "twin"])
    assert router.routes() == []
