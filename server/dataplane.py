"""The one orchestrator every frontend calls: catalog -> validate -> scheduler -> stats."""

from __future__ import annotations

import asyncio
import time

from server.codec.validate import validate_request
from server.errors import PeregrineError
from server.interfaces import ModelCatalog
from server.types import InferRequest, InferResponse

_now = time.perf_counter_ns


class DataPlane:
    def __init__(self, catalog: ModelCatalog) -> None:
        self._catalog = catalog

    async def infer(self, request: InferRequest) -> InferResponse:
        model = self._catalog.get(request.model_name, request.model_version)
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
        return response
