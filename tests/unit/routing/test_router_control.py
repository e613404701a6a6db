"""server.routing.router.Router without a server: routing decisions and table control."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from server.metrics.routing import RoutingMetrics
from server.routing.router import Router
from server.routing.shadow import ShadowMirror
from server.routing.splitter import pick_sticky
from server.routing.store import RouteStore
from server.routing.table import Canary, RouteTable, Variant
from server.types import DataType, InferRequest
from tests.unit.routing.test_route_table import lookup


class FailingStore(RouteStore):
    fail = False

    def write(self, table: RouteTable) -> None:
        if self.fail:
            raise OSError("disk full")
        super().write(table)


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


async def test_a_failed_persist_keeps_the_old_table_and_its_canary(router: Router) -> None:
    canary = table(100, 0, canary=Canary(baseline="a", candidate="b", steps=(10, 100),
                                               step_interval_secs=3600))
    router.set_table(canary, "t")
    store = router._store
    assert isinstance(store, FailingStore)
    store.fail = True
    with pytest.raises(OSError, match="disk full"):
        router.set_table(table(0, 100), "t")
    status = router.status("m")
    assert status.canary_state == "running"
    assert [v.weight for v in status.table.variants] == [90, 10]
    promoted = router.promote  # the canary is still driven and controllable
    store.fail = False
    assert promoted("m", "t").canary_state == "promoted"


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
