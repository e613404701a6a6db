"""The one orchestrator every frontend calls: route -> catalog -> validate -> scheduler."""

from __future__ import annotations

import asyncio
import time

from server.codec.validate import validate_request
from server.errors import PeregrineError
from server.interfaces import DriftSample, DriftSink, ModelCatalog, Router
from server.types import InferRequest, InferResponse

_now = time.perf_counter_ns


class DataPlane:
    def __init__(
        self, catalog: ModelCatalog, router: Router | None = None, drift: DriftSink | None = None
    ) -> None:
        self._catalog = catalog
        self._router = router
        #: None unless some model monitors drift: then the request path pays one attribute check.
        self._drift = drift

    async def infer(self, request: InferRequest) -> InferResponse:
        decision = self._router.route(request) if self._router is not None else None
        if decision is None:
            return await self._serve(request, request.model_name, request.model_version)
        assert self._router is not None
        start = _now()
        try:
            response = await self._serve(request, decision.model, decision.version)
        except asyncio.CancelledError:
            raise  # the caller went away: no verdict on the variant
        except Exception:
            self._router.finish(decision, request, None, (_now() - start) / 1e9)
            raise
        response.parameters["routing_variant"] = decision.variant
        self._router.finish(decision, request, response, (_now() - start) / 1e9)
        return response

    async def _serve(self, request: InferRequest, name: str, version: str) -> InferResponse:
        model = self._catalog.get(name, version)
        metrics = model.metrics
        stats = metrics.stats
        start = _now()
        try:
            validate_request(request, model.spec)
            response = await model.scheduler.submit(request)
        except PeregrineError as exc:
            stats.record_failure(exc.reason, _now() - start)
            raise
        except asyncio.CancelledError:
            stats.record_failure("CANCELED", _now() - start)
            raise
        except Exception:
            stats.record_failure("OTHER", _now() - start)
            raise
        elapsed = _now() - start
        stats.success.add(elapsed)
        metrics.request_seconds.observe(elapsed / 1e9)
        drift = self._drift
        if drift is not None:
            drift.offer(DriftSample(model, request, response))
        return response
