"""server.routing.table.build_route: validation of routing tables into frozen routes."""

from __future__ import annotations

import dataclasses
import math

import pytest

from server.errors import InvalidInput, ModelNotFound
from server.routing.table import (
    DEFAULT_SHADOW_PENDING,
    DEFAULT_SHADOW_PENDING_BYTES,
    Canary,
    Route,
    RouteTable,
    Shadow,
    Variant,
    build_route,
)
from server.spec import ModelSpec, TensorSpec
from server.types import DataType


def spec(name: str, width: int = 16, dtype: DataType = DataType.FP32,
         max_batch_size: int = 8) -> ModelSpec:
    return ModelSpec(
        name=name, platform="onnxruntime_onnx", backend="onnxruntime",
        max_batch_size=max_batch_size,
        inputs=(TensorSpec("INPUT0", dtype, (width,)),),
        outputs=(TensorSpec("OUTPUT0", dtype, (width,)),),
    )


MODELS = {
    "m": (spec("m"), {"1", "2", "3"}),
    "twin": (spec("twin"), {"1"}),  # same signature as m
    "wide": (spec("wide", width=32), {"1"}),
    "ints": (spec("ints", dtype=DataType.INT32), {"1"}),
    "unbatched": (spec("unbatched", max_batch_size=0), {"1"}),
}


def lookup(model: str, version: str) -> ModelSpec:
    if model not in MODELS:
        raise ModelNotFound(f"unknown model '{model}'")
    found, versions = MODELS[model]
    if version and version not in versions:
        raise ModelNotFound(f"unknown version '{version}' of model '{model}'")
    return found


def table(*variants: tuple[str, str, float] | Variant, model: str = "m",
          **fields: object) -> RouteTable:
    return RouteTable(model=model, variants=tuple(  # type: ignore[arg-type]
        Variant(name=v[0], version=v[1], weight=v[2]) if isinstance(v, tuple) else v
        for v in variants
    ), **fields)


def shadowed(base: RouteTable, target: Variant, fraction: float = 0.0) -> RouteTable:
    return dataclasses.replace(base, shadow=Shadow(target=target, fraction=fraction))


def rejected(bad: RouteTable) -> str:
    with pytest.raises(InvalidInput) as info:
        build_route(bad, lookup)
    return info.value.message


AB = (("a", "1", 90.0), ("b", "2", 10.0))


# -- accepted tables ------------------------------------------------------------------------------


def test_a_valid_table_becomes_a_frozen_route_with_defaults() -> None:
    route = build_route(table(*AB), lookup)
    assert isinstance(route, Route)
    assert route.model == "m"
    assert route.names == ("a", "b") and route.weights == (90.0, 10.0)
    assert route.cumulative == (90.0, 100.0)
    assert [(t.model, t.version) for t in route.variants] == [("m", "1"), ("m", "2")]
    assert route.sticky_parameter == "routing_key"
    assert route.shadow is None and route.canary is None


def test_another_model_with_the_same_signature_and_latest_versions_are_accepted() -> None:
    route = build_route(table(("a", "", 1.0), Variant(name="t", model="twin", weight=1.0),
                              sticky_parameter="x-routing-key"), lookup)
    assert [(t.model, t.version) for t in route.variants] == [("m", ""), ("twin", "")]
    assert route.sticky_parameter == "x-routing-key"


def test_zero_weights_are_allowed_while_some_weight_is_positive() -> None:
    route = build_route(table(("a", "1", 100.0), ("b", "2", 0.0)), lookup)
    assert route.weights == (100.0, 0.0)


def test_shadow_defaults_fraction_1_and_256_pending_in_64_mib() -> None:
    bare = shadowed(table(*AB), Variant(name="s", version="3"))
    shadow = build_route(bare, lookup).shadow
    assert shadow is not None
    assert shadow.fraction == 1.0 and shadow.max_pending == DEFAULT_SHADOW_PENDING
    assert shadow.max_pending_bytes == DEFAULT_SHADOW_PENDING_BYTES == 64 * 2**20
    assert (shadow.target.model, shadow.target.version) == ("m", "3")


def test_canary_defaults() -> None:
    planned = table(*AB, canary=Canary(baseline="a", candidate="b"))
    canary = build_route(planned, lookup).canary
    assert canary is not None
    assert canary.steps == (1.0, 10.0, 50.0, 100.0)
    assert canary.step_interval_secs == 60.0 and canary.max_p99_ratio == 1.5
    assert canary.max_error_rate_increase == 0.01 and canary.min_requests == 20


def test_a_canary_table_may_leave_every_weight_at_zero() -> None:
    planned = table(("a", "1", 0.0), ("b", "2", 0.0),
                    canary=Canary(baseline="a", candidate="b", steps=(5, 100)))
    assert build_route(planned, lookup).canary is not None


def test_with_weights_and_finished() -> None:
    planned = table(*AB, canary=Canary(baseline="a", candidate="b"))
    route = build_route(planned, lookup)
    stepped = route.with_weights({"b": 50.0, "a": 50.0})
    assert stepped.weights == (50.0, 50.0) and stepped.cumulative == (50.0, 100.0)
    assert [v.weight for v in stepped.table.variants] == [50.0, 50.0]
    assert stepped.canary is route.canary
    assert [v.weight for v in route.table.variants] == [90.0, 10.0]  # the original is intact
    done = route.finished({"b": 100.0, "a": 0.0})
    assert done.canary is None and done.table.canary is None
    assert done.weights == (0.0, 100.0)


# -- rejected tables ------------------------------------------------------------------------------


def test_unknown_model() -> None:
    assert "unknown model 'nope'" in rejected(table(*AB, model="nope"))
    assert "names no model" in rejected(table(*AB, model=""))


def test_unknown_version() -> None:
    message = rejected(table(("a", "1", 50.0), ("b", "7", 50.0)))
    assert "variant 'b'" in message and "unknown version '7'" in message


def test_unknown_model_of_a_variant() -> None:
    message = rejected(table(("a", "1", 1.0), Variant(name="o", model="other", weight=1)))
    assert "variant 'o'" in message and "unknown model 'other'" in message


def test_no_variants_and_nameless_variants() -> None:
    assert "has no variants" in rejected(table())
    assert "has no name" in rejected(table(("", "1", 1.0)))


def test_duplicate_names() -> None:
    assert "'a' appears twice" in rejected(table(("a", "1", 1.0), ("a", "2", 1.0)))


@pytest.mark.parametrize("weight", [-1.0, math.nan, math.inf])
def test_negative_or_non_finite_weights(weight: float) -> None:
    message = rejected(table(("a", "1", 1.0), ("b", "2", weight)))
    assert "variant 'b'" in message and "weight must be a finite number >= 0" in message


def test_weights_adding_up_to_zero() -> None:
    assert "weights add up to 0" in rejected(table(("a", "1", 0.0), ("b", "2", 0.0)))


@pytest.mark.parametrize("other", ["wide", "ints", "unbatched"])
def test_signature_mismatch_with_another_model(other: str) -> None:
    message = rejected(table(("a", "1", 1.0), Variant(name="x", model=other, weight=1)))
    assert f"model '{other}' does not have the inputs and outputs of 'm'" in message


def test_shadow_signature_and_version_are_checked() -> None:
    bad = shadowed(table(*AB), Variant(name="s", model="wide"))
    assert "shadow: model 'wide' does not have the inputs and outputs" in rejected(bad)
    bad = shadowed(table(*AB), Variant(name="s", version="9"))
    assert "shadow: unknown version '9'" in rejected(bad)


@pytest.mark.parametrize("fraction", [-0.5, 1.5, math.nan])
def test_shadow_fraction_out_of_range(fraction: float) -> None:
    bad = shadowed(table(*AB), Variant(name="s", version="3"), fraction)
    assert "shadow fraction must be within (0, 1]" in rejected(bad)


@pytest.mark.parametrize(("canary", "expected"), [
    (Canary(baseline="x", candidate="b"), "canary baseline 'x' is not a variant"),
    (Canary(baseline="a", candidate="y"), "canary candidate 'y' is not a variant"),
    (Canary(baseline="", candidate="b"), "canary baseline '' is not a variant"),
    (Canary(baseline="a", candidate="a"), "baseline and candidate must differ"),
    (Canary(baseline="a", candidate="b", steps=(10, 5)), "steps must rise"),
    (Canary(baseline="a", candidate="b", steps=(10, 10)), "steps must rise"),
    (Canary(baseline="a", candidate="b", steps=(0, 50)), "steps must rise"),
    (Canary(baseline="a", candidate="b", steps=(50, 150)), "steps must rise"),
    (Canary(baseline="a", candidate="b", steps=(-5,)), "steps must rise"),
    (Canary(baseline="a", candidate="b", step_interval_secs=-1),
     "step_interval_secs must be positive"),
    (Canary(baseline="a", candidate="b", max_p99_ratio=0.5),
     "max_p99_ratio must be at least 1"),
    (Canary(baseline="a", candidate="b", step_interval_secs=math.nan),
     "step_interval_secs must be positive"),
    (Canary(baseline="a", candidate="b", step_interval_secs=math.inf),
     "step_interval_secs must be positive"),
    (Canary(baseline="a", candidate="b", max_p99_ratio=math.nan),
     "max_p99_ratio must be at least 1"),
    (Canary(baseline="a", candidate="b", max_error_rate_increase=math.nan),
     "max_error_rate_increase must be within [0, 1]"),
    (Canary(baseline="a", candidate="b", steps=(math.nan,)), "steps must rise"),
    (Canary(baseline="a", candidate="b", max_error_rate_increase=2),
     "max_error_rate_increase must be within [0, 1]"),
])
def test_canary_errors(canary: Canary, expected: str) -> None:
    assert expected in rejected(table(*AB, canary=canary))
