"""Shadow mirroring: copies of primary traffic go to a shadow variant, off the caller's path.

The caller already has its response when a copy is offered. Copies wait in a queue per routed
model, bounded in count and in bytes (the copy's inputs and the primary's outputs it keeps for
the comparison; full: dropped and counted), and a few worker tasks run them; their results
are only compared with the primary's, never returned, and their failures are only counted.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import mmap
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import numpy as np

from server.footprint import arrays_bytes, outputs_bytes
from server.metrics.routing import RoutingMetrics, ShadowMetrics
from server.routing.table import ShadowSpec
from server.types import InferRequest, InferResponse

log = logging.getLogger(__name__)
WORKERS_PER_MODEL = 2
REL_DIFF_FLOOR = 1e-6


@dataclass(slots=True)
class Agreement:
    mirrored: int = 0
    dropped: int = 0
    failed: int = 0
    compared: int = 0
    class_elements: int = 0
    class_agreed: int = 0
    float_elements: int = 0
    abs_diff_sum: float = 0.0
    max_abs_diff: float = 0.0
    max_rel_diff: float = 0.0

    @property
    def agreement(self) -> float:
        return self.class_agreed / self.class_elements if self.class_elements else 1.0

    @property
    def mean_abs_diff(self) -> float:
        return self.abs_diff_sum / self.float_elements if self.float_elements else 0.0

    def compare(self, primary: InferResponse, shadow: InferResponse) -> None:
        theirs = {t.name: t.data for t in shadow.outputs}
        for tensor in primary.outputs:
            other = theirs.get(tensor.name)
            mine = tensor.data
            if other is None or other.shape != mine.shape:
                continue
            if mine.dtype.kind in "iub":
                self.class_elements += mine.size
                self.class_agreed += int(np.count_nonzero(mine == other))
            elif mine.dtype.kind == "f":
                diff = np.abs(mine.astype(np.float64) - other.astype(np.float64))
                self.float_elements += diff.size
                self.abs_diff_sum += float(diff.sum())
                self.max_abs_diff = max(self.max_abs_diff, float(diff.max(initial=0.0)))
                # Relative to the larger magnitude, floored so that two near-zero scores
                # do not make a huge ratio out of a negligible difference.
                scale = np.maximum(np.maximum(np.abs(mine), np.abs(other)), REL_DIFF_FLOOR)
                self.max_rel_diff = max(self.max_rel_diff, float((diff / scale).max(initial=0.0)))
        self.compared += 1


@dataclass(slots=True)
class _Lane:
    spec: ShadowSpec
    metrics: ShadowMetrics
    #: (copy, primary response, bytes the two hold)
    pending: deque[tuple[InferRequest, InferResponse, int]]
    wake: asyncio.Event
    figures: Agreement
    workers: list[asyncio.Task[None]]
    pending_bytes: int = 0


def _maps_shared_memory(array: np.ndarray) -> bool:
    base: object = array
    while isinstance(base, np.ndarray):
        base = base.base
    if isinstance(base, memoryview):
        base = base.obj
    return isinstance(base, mmap.mmap)


def _detached(request: InferRequest) -> InferRequest:
    """A copy whose inputs no longer read a client's shared-memory region: the client may
    rewrite the region once it has its response, before the shadow runs."""
    if not any(_maps_shared_memory(value) for value in request.inputs.values()):
        return request
    return dataclasses.replace(
        request,
        inputs={name: np.array(value, copy=True) if _maps_shared_memory(value) else value
                for name, value in request.inputs.items()},
    )


#: Sends one request through the data plane (validation, scheduler, statistics), as every
#: request goes; the shadow's copies name their version, so they are not routed again.
Send = Callable[[InferRequest], Awaitable[InferResponse]]


class ShadowMirror:
    def __init__(self, metrics: RoutingMetrics) -> None:
        self._metrics = metrics
        self._send: Send | None = None
        self._lanes: dict[str, _Lane] = {}

    def connect(self, send: Send) -> None:
        """Wire the data plane in (it owns the router that owns this mirror)."""
        self._send = send

    def configure(self, model: str, spec: ShadowSpec | None) -> None:
        """Start, change or stop mirroring for ``model`` (on the event loop)."""
        lane = self._lanes.get(model)
        if lane is not None and spec is not None and lane.spec.target == spec.target:
            lane.spec = spec
            return
        if lane is not None:
            for worker in lane.workers:
                worker.cancel()
            del self._lanes[model]
            if spec is None or spec.target.name != lane.spec.target.name:
                self._metrics.forget_shadow(model, lane.spec.target.name)
        if spec is None:
            return
        lane = _Lane(spec=spec, metrics=self._metrics.shadow(model, spec.target.name),
                     pending=deque(), wake=asyncio.Event(), figures=Agreement(), workers=[])
        loop = asyncio.get_running_loop()
        lane.workers = [loop.create_task(self._work(model, lane), name=f"shadow-{model}")
                        for _ in range(WORKERS_PER_MODEL)]
        self._lanes[model] = lane

    def figures(self, model: str) -> Agreement | None:
        lane = self._lanes.get(model)
        return lane.figures if lane is not None else None

    def offer(self, model: str, request: InferRequest, primary: InferResponse) -> bool:
        """Queue a copy of a served request; never blocks, False when it had to drop it."""
        lane = self._lanes.get(model)
        if lane is None:
            return False
        size = arrays_bytes(request.inputs.values()) + outputs_bytes(primary.outputs)
        if (len(lane.pending) >= lane.spec.max_pending
                or lane.pending_bytes + size > lane.spec.max_pending_bytes):
            lane.figures.dropped += 1
            lane.metrics.dropped.inc()
            return False
        lane.pending.append((_detached(request), primary, size))
        lane.pending_bytes += size
        lane.wake.set()
        return True

    async def _work(self, model: str, lane: _Lane) -> None:
        target = lane.spec.target
        while True:
            if not lane.pending:
                lane.wake.clear()
                await lane.wake.wait()
                continue
            request, primary, size = lane.pending.popleft()
            lane.pending_bytes -= size
            copy = dataclasses.replace(
                request, model_name=target.model, model_version=target.version,
                deadline_ns=None, priority=0, timeout_us=0,
            )
            lane.figures.mirrored += 1
            lane.metrics.mirrored.inc()
            try:
                if self._send is None:
                    raise RuntimeError("the shadow mirror is not connected to a data plane")
                response = await self._send(copy)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                lane.figures.failed += 1
                lane.metrics.failed.inc()
                log.debug("shadow request failed", extra={"model": model, "error": repr(exc)})
                continue
            lane.figures.compare(primary, response)
            lane.metrics.agreement.set(lane.figures.agreement)
            lane.metrics.max_abs_diff.set(lane.figures.max_abs_diff)
            lane.metrics.mean_abs_diff.set(lane.figures.mean_abs_diff)

    async def close(self) -> None:
        workers = [w for lane in self._lanes.values() for w in lane.workers]
        for worker in workers:
            worker.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
        self._lanes.clear()
