"""server.routing.shadow.ShadowMirror's queue: bounded in copies and in bytes; a shadow's
series go with it."""

from __future__ import annotations

import asyncio

import numpy as np
from prometheus_client import CollectorRegistry

from server.metrics.routing import RoutingMetrics
from server.routing.shadow import ShadowMirror
from server.routing.table import ShadowSpec, Target
from server.types import DataType, InferRequest, InferResponse, OutputTensor

KIB = 1024


def request(floats: int) -> InferRequest:
    return InferRequest(model_name="m", model_version="", id="",
                        inputs={"x": np.ones((1, floats), np.float32)},
                        input_types={"x": DataType.FP32})


def response(floats: int) -> InferResponse:
    """Raw outputs, as the native unpacker makes them: counted without an array."""
    return InferResponse(model_name="m", model_version="1", id="", outputs=[
        OutputTensor("y", DataType.FP32, raw=bytes(4 * floats), shape=(1, floats))])


def spec(target: str = "s", max_pending: int = 100, max_pending_bytes: int = 5 * KIB
         ) -> ShadowSpec:
    return ShadowSpec(Target(target, "m", "2", 0.0), fraction=1.0, max_pending=max_pending,
                      max_pending_bytes=max_pending_bytes)


async def test_copies_wait_within_the_byte_budget() -> None:
    registry = CollectorRegistry()
    mirror = ShadowMirror(RoutingMetrics(registry))
    release = asyncio.Event()
    sent: list[InferRequest] = []

    async def send(copy: InferRequest) -> InferResponse:
        await release.wait()
        sent.append(copy)
        return response(256)

    mirror.connect(send)
    mirror.configure("m", spec())
    # Each copy holds 1 KiB of input and 1 KiB of primary output: two fit in 5 KiB.
    offered = [mirror.offer("m", request(256), response(256)) for _ in range(3)]
    assert offered == [True, True, False]
    # A copy larger than the whole budget never waits, even in an empty queue.
    await asyncio.sleep(0.01)  # the workers take the two waiting copies (and wait to send)
    assert not mirror.offer("m", request(2 * KIB), response(1))
    assert mirror.offer("m", request(256), response(256))
    release.set()
    for _ in range(100):
        if len(sent) == 3:
            break
        await asyncio.sleep(0.01)
    assert len(sent) == 3
    figures = mirror.figures("m")
    assert figures is not None and figures.dropped == 2
    assert registry.get_sample_value("peregrine_shadow_dropped_total",
                                     {"model": "m", "variant": "s"}) == 2
    # Once the copies ran, the budget is free again.
    assert mirror.offer("m", request(256), response(256))
    await mirror.close()


async def test_the_count_bound_still_holds() -> None:
    mirror = ShadowMirror(RoutingMetrics(CollectorRegistry()))
    mirror.configure("m", spec(max_pending=2, max_pending_bytes=10**9))
    assert [mirror.offer("m", request(4), response(4)) for _ in range(3)] == [True, True, False]
    await mirror.close()


async def test_a_shadows_series_go_when_it_does() -> None:
    registry = CollectorRegistry()
    mirror = ShadowMirror(RoutingMetrics(registry))
    mirror.configure("m", spec("old", max_pending=1))
    mirror.offer("m", request(4), response(4))
    mirror.offer("m", request(4), response(4))  # dropped: a series exists

    def dropped(variant: str) -> float | None:
        value: float | None = registry.get_sample_value(
            "peregrine_shadow_dropped_total", {"model": "m", "variant": variant})
        return value

    assert dropped("old") == 1
    mirror.configure("m", spec("new"))
    assert dropped("old") is None and dropped("new") == 0
    mirror.configure("m", None)
    assert dropped("new") is None
    await mirror.close()
