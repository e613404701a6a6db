"""The one orchestrator every frontend calls: route -> catalog -> validate -> scheduler."""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Hashable

from server.codec.validate import validate_request
from server.errors import ModelNotReady, PeregrineError
from server.interfaces import (
    DriftSample,
    DriftSink,
    LoadedModel,
    ModelCatalog,
    ModelMetrics,
    ResponseCache,
    Router,
)
from server.security.names import check_model_name
from server.types import InferRequest, InferResponse, ParsedRequest, RouteDecision

_now = time.perf_counter_ns


def _reason(exc: BaseException) -> str:
    return exc.reason if isinstance(exc, PeregrineError) else "OTHER"


class DataPlane:
    """Per request, on the event loop thread. Reads the catalog snapshot the repository
    manager last published (``use_catalog``) and never writes repository state."""

    def __init__(
        self, catalog: ModelCatalog, router: Router | None = None, drift: DriftSink | None = None
    ) -> None:
        self._catalog = catalog
        self._router = router
        #: None unless some model monitors drift: then the request path pays one attribute check.
        self._drift = drift

    def use_catalog(self, catalog: ModelCatalog) -> None:
        """Serve from ``catalog`` from now on (the manager publishes one on every change)."""
        self._catalog = catalog

    def submit(self, request: InferRequest, lone: bool = False) -> asyncio.Future[InferResponse]:
        """Route, validate and queue ``request``; errors found before queueing raise here.
        ``lone`` as Scheduler.submit has it (the frontend says whether more may follow).

        The future resolves with the response once the scheduler has counted it and, when the
        request was routed or drift is monitored, once routing and drift have seen it;
        cancelling it withdraws the request. No task per request: a stream waits with a
        callback. A request that is neither routed nor sampled costs no callback here.
        """
        router = self._router
        decision = router.route(request) if router is not None else None
        if decision is None:
            name, version = request.model_name, request.model_version
        else:
            name, version = decision.model, decision.version
        start = _now()
        try:
            model = self._catalog.get(name, version)
        except Exception as exc:
            # The router chose the target, not the client: a target that is not served
            # counts against its variant whatever the status says (NOT_FOUND for a version
            # unloaded since the table was set).
            self._finish_route(decision, request, ModelNotReady(str(exc)), start)
            # Only a miss pays for the name check (the catalog's names were checked when they
            # loaded): a name that could be a path answers INVALID_ARGUMENT, not NOT_FOUND.
            check_model_name(name)
            raise
        try:
            validate_request(request, model.spec)
            cache = model.cache
            if cache is None:
                future = model.scheduler.submit(request, lone)
            else:
                future = _through_cache(model, cache, request, lone, start)
        except Exception as exc:
            model.metrics.request_failed(_reason(exc), _now() - start)
            self._finish_route(decision, request, exc, start)
            raise
        if decision is not None or self._drift is not None:
            finished = functools.partial(self._finished, model, request, decision, start)
            if future.done():
                # Answered already (a lone request run inline): a callback would run only
                # after the caller has taken the response without the routing verdict.
                finished(future)
            else:
                future.add_done_callback(finished)
        return future

    def cached(self, parsed: ParsedRequest
               ) -> tuple[InferResponse | None, tuple[Hashable, int] | None]:
        """The stored answer to a request still in its parsed form, counted as a cache hit;
        or, on a miss, its key and the lookup's nanoseconds, for the request's
        ``cache_miss`` once decoded (submit then neither keys nor looks it up again, and
        counts the miss); or neither, when the request must be decoded to be looked up.
        Before decoding, so a hit skips decoding, validation and the queue; only for a
        request that no routing table steers and no drift monitor samples (those need the
        decoded request), and whose key the parsed form gives (cache/key.py)."""
        model_name, model_version = parsed[0], parsed[1]
        if self._drift is not None or (
                not model_version and self._router is not None
                and self._router.has_route(model_name)):
            return None, None
        start = _now()
        try:
            model = self._catalog.get(model_name, model_version)
        except PeregrineError:
            return None, None  # decoding and submitting answer with the reason
        cache = model.cache
        if cache is None:
            return None, None
        looked_up = _now()
        key = cache.parsed_key(parsed)
        if key is None:
            return None, None
        response = cache.get(key, parsed[2])
        done = _now()
        if response is None:
            return None, (key, done - looked_up)
        model.metrics.cache_hit(done - looked_up, done - start)
        return response, None

    def _finished(
        self,
        model: LoadedModel,
        request: InferRequest,
        decision: RouteDecision | None,
        start: int,
        future: asyncio.Future[InferResponse],
    ) -> None:
        """Runs before the waiter resumes (callbacks run in the order they were added)."""
        if future.cancelled():
            return  # the caller went away: no verdict on the variant
        error = future.exception()
        if error is not None:
            self._finish_route(decision, request, error, start)
            return
        response = future.result()
        if decision is not None:
            response.parameters["routing_variant"] = decision.variant
            self._finish_route(decision, request, response, start)
        drift = self._drift
        if drift is not None:
            drift.offer(DriftSample(model, request, response))

    def _finish_route(
        self, decision: RouteDecision | None, request: InferRequest,
        result: InferResponse | BaseException, start: int,
    ) -> None:
        if decision is not None and self._router is not None:
            self._router.finish(decision, request, result, (_now() - start) / 1e9)


def _through_cache(
    model: LoadedModel, cache: ResponseCache, request: InferRequest, lone: bool, start: int
) -> asyncio.Future[InferResponse]:
    """A hit is answered here, already done: no queue, no batch, no backend call. A miss goes
    to the scheduler, and its answer is stored once it succeeds (a failed or cancelled
    request stores nothing). Two identical requests in flight at once both miss and both
    run; the later answer replaces the earlier one."""
    missed = getattr(request, "cache_miss", None)
    if missed is not None:
        # Looked up before decoding, and nothing ran since: a miss still.
        key, lookup_ns = missed
    else:
        looked_up = _now()
        key = cache.key(request)
        response = cache.get(key, request.id)
        done = _now()
        lookup_ns = done - looked_up
        if response is not None:
            model.metrics.cache_hit(lookup_ns, done - start)
            future: asyncio.Future[InferResponse] = \
                asyncio.get_running_loop().create_future()
            future.set_result(response)
            return future
    try:
        future = model.scheduler.submit(request, lone)
    except BaseException:
        model.metrics.cache_miss(lookup_ns)
        raise
    store = functools.partial(_store, cache, key, model.metrics, lookup_ns)
    if future.done():
        store(future)  # answered inline: stored before the caller or a callback sees it
    else:
        future.add_done_callback(store)
    return future


def _store(cache: ResponseCache, key: Hashable, metrics: ModelMetrics, lookup_ns: int,
           future: asyncio.Future[InferResponse]) -> None:
    """Runs before the waiter resumes: the miss's answer is stored before anyone sees it."""
    if future.cancelled() or future.exception() is not None:
        metrics.cache_miss(lookup_ns)
        return
    started = _now()
    cache.put(key, future.result())
    metrics.cache_miss(lookup_ns + _now() - started)
