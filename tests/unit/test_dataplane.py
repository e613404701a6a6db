"""server.dataplane.DataPlane with a scheduler that answers at once (as a lone unary request
run inline does): the routing verdict is on the response before the caller sees it."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import numpy as np

from server.cache import ServerCache, VersionShare
from server.dataplane import DataPlane
from server.metrics import MetricsRegistry
from server.spec import ModelSpec, TensorSpec
from server.types import DataType, InferRequest, InferResponse, RouteDecision

SPEC = ModelSpec(name="m", platform="onnxruntime_onnx", backend="onnxruntime", max_batch_size=8,
                 inputs=(TensorSpec("x", DataType.FP32, (4,)),),
                 outputs=(TensorSpec("y", DataType.FP32, (4,)),))


class AnsweringScheduler:
    """Resolves every request's future before submit returns."""

    healthy = True

    def __init__(self) -> None:
        self.lone: list[bool] = []

    def submit(self, request: InferRequest, lone: bool = False) -> asyncio.Future[InferResponse]:
        self.lone.append(lone)
        future: asyncio.Future[InferResponse] = asyncio.get_running_loop().create_future()
        future.set_result(InferResponse(model_name="m", model_version="2", id=request.id,
                                        outputs=[]))
        return future


@dataclass
class Served:
    spec: ModelSpec
    version: str
    scheduler: AnsweringScheduler
    metrics: object = None
    cache: VersionShare | None = None


@dataclass
class OneModel:
    served: Served

    def get(self, name: str, version: str) -> Served:
        return self.served


@dataclass
class AlwaysB:
    verdicts: list[tuple[str, bool]] = field(default_factory=list)

    def route(self, request: InferRequest) -> RouteDecision | None:
        return RouteDecision("m", "b", "m", "2")

    def finish(self, decision: RouteDecision, request: InferRequest,
               result: InferResponse | BaseException, seconds: float) -> None:
        self.verdicts.append((decision.variant, isinstance(result, InferResponse)))


async def test_an_answer_ready_at_submit_carries_the_routing_verdict() -> None:
    scheduler = AnsweringScheduler()
    router = AlwaysB()
    plane = DataPlane(OneModel(Served(SPEC, "2", scheduler)), router)  # type: ignore[arg-type]
    request = InferRequest(model_name="m", model_version="", id="r1",
                           inputs={"x": np.zeros((1, 4), np.float32)},
                           input_types={"x": DataType.FP32})
    future = plane.submit(request, lone=True)
    assert future.done()
    assert future.result().parameters["routing_variant"] == "b"
    assert router.verdicts == [("b", True)]
    assert scheduler.lone == [True]


async def test_a_hit_skips_the_scheduler_and_carries_only_its_own_routing_verdict() -> None:
    scheduler = AnsweringScheduler()
    router = AlwaysB()
    metrics = MetricsRegistry().version("m", "2")
    served = Served(SPEC, "2", scheduler, metrics,
                    ServerCache(1 << 20).for_version(SPEC, "2"))  # type: ignore[arg-type]
    routed = DataPlane(OneModel(served), router)  # type: ignore[arg-type]
    plain = DataPlane(OneModel(served))  # type: ignore[arg-type]

    def request(request_id: str) -> InferRequest:
        return InferRequest(model_name="m", model_version="", id=request_id,
                            inputs={"x": np.ones((1, 4), np.float32)},
                            input_types={"x": DataType.FP32})

    first = routed.submit(request("r1"), lone=True)  # answered inline, then stored
    assert first.result().parameters == {"routing_variant": "b"}
    hit = routed.submit(request("r2"))
    assert hit.done() and hit.result().id == "r2"
    assert hit.result().parameters == {"routing_variant": "b"}
    unrouted = plain.submit(request("r3"))
    assert unrouted.result().id == "r3" and unrouted.result().parameters == {}
    assert scheduler.lone == [True]  # only the first request reached the scheduler
    assert router.verdicts == [("b", True), ("b", True)]
    stats = metrics.stats
    assert (stats.cache_miss.count, stats.cache_hit.count, stats.success.count) == (1, 2, 2)
