"""The router: picks the variant of each request, mirrors to shadows, runs canaries."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from server.errors import InvalidInput, NotAllowed
from server.metrics.routing import RoutingMetrics
from server.routing.canary import judge
from server.routing.figures import VariantStats
from server.routing.outcome import Outcome, classify
from server.routing.shadow import Agreement, ShadowMirror
from server.routing.splitter import pick_sticky, pick_weighted
from server.routing.store import RouteStore, table_to_json
from server.routing.table import Route, RouteTable, SpecLookup, build_route
from server.types import InferRequest, InferResponse, RouteDecision

log = logging.getLogger(__name__)
CANARY_TICK_SECS = 0.5


@dataclass(frozen=True, slots=True)
class VariantStatus:
    name: str
    model: str
    version: str
    weight: float
    requests: int
    errors: int
    #: Over the variant's latest (up to 4,096) requests.
    p99_ms: float


@dataclass(frozen=True, slots=True)
class RouteStatus:
    """A model's table in force and its live figures."""

    table: RouteTable
    variants: tuple[VariantStatus, ...] = ()
    #: A copy of the shadow's figures; None without a shadow.
    shadow: Agreement | None = None
    #: "none", "running", "promoted", "rolled_back" or "failed".
    canary_state: str = "none"
    canary_step: int = 0
    canary_reason: str = ""
    #: Why the table in force is not what the routing file says (empty: it is): its last
    #: change could not be written (a read-only repository), so it holds in memory only and a
    #: restart applies the file on disk instead.
    persist_error: str = ""


@dataclass(slots=True)
class CanaryRun:
    state: str = "running"  # running, promoted, rolled_back, failed
    step: int = 0
    reason: str = ""
    started: float = field(default_factory=time.monotonic)
    baseline_mark: tuple[int, int, int] = (0, 0, 0)
    candidate_mark: tuple[int, int, int] = (0, 0, 0)
    task: asyncio.Task[None] | None = None


class Router:
    """Owned by the dataplane; every method runs on the event loop thread."""

    def __init__(
        self,
        lookup: SpecLookup,
        metrics: RoutingMetrics,
        mirror: ShadowMirror,
        store: RouteStore,
        rng: random.Random | None = None,
    ) -> None:
        self._lookup = lookup
        self._metrics = metrics
        self._mirror = mirror
        self._store = store
        self._rng = rng or random.Random()
        self._routes: dict[str, Route] = {}
        self._stats: dict[tuple[str, str], VariantStats] = {}
        self._canaries: dict[str, CanaryRun] = {}
        #: Per model, why its table in force could not be persisted (see RouteStatus).
        self._unsaved: dict[str, str] = {}

    # -- the hot path ------------------------------------------------------------------------

    def route(self, request: InferRequest) -> RouteDecision | None:
        """None when the model has no table or the request names its version."""
        route = self._routes.get(request.model_name)
        if route is None or request.model_version:
            return None
        key = request.parameters.get(route.sticky_parameter)
        if key is not None and key != "":
            index = pick_sticky(str(key), route.names, route.weights)
        else:
            index = pick_weighted(route.cumulative, self._rng)
        target = route.variants[index]
        shadow = route.shadow
        mirror = shadow is not None and (
            shadow.fraction >= 1.0 or self._rng.random() < shadow.fraction
        )
        return RouteDecision(route.model, target.name, target.model, target.version, mirror)

    def finish(
        self,
        decision: RouteDecision,
        request: InferRequest,
        result: InferResponse | BaseException,
        seconds: float,
    ) -> None:
        model = decision.route_model
        stats = self._stats.get((model, decision.variant))
        if stats is None:
            route = self._routes.get(model)
            if route is None or decision.variant not in route.names:
                return  # decided under a table since replaced: the variant is gone
            stats = self._variant_stats(model, decision.variant)
        if isinstance(result, BaseException):
            stats.record(seconds, classify(result, request, seconds))
            return
        stats.record(seconds, Outcome.OK)
        if decision.mirror:
            self._mirror.offer(model, request, result)

    def _variant_stats(self, model: str, variant: str) -> VariantStats:
        """The live figures of a variant of the model's table in force."""
        stats = self._stats.get((model, variant))
        if stats is None:
            stats = self._stats[(model, variant)] = VariantStats(
                self._metrics.variant(model, variant)
            )
        return stats

    # -- control -------------------------------------------------------------------------------

    def load_persisted(self, models: list[str]) -> None:
        """Apply the routing files found beside the models (at start and when polling)."""
        for model in models:
            if not self._store.changed(model):
                continue
            try:
                table = self._store.read(model)
            except InvalidInput as exc:
                log.error("routing file rejected", extra={"model": model, "reason": exc.message})
                continue
            if table is None:
                if model in self._routes:
                    self._apply_clear(model, "routing file removed", persist=False)
                continue
            try:
                self._apply(build_route(table, self._lookup), "routing file", persist=False)
            except InvalidInput as exc:
                log.error("routing file rejected", extra={"model": model, "reason": exc.message})

    def set_table(self, table: RouteTable, who: str) -> RouteStatus:
        route = build_route(table, self._lookup)
        # A new table starts its variants' live figures afresh (Prometheus keeps the totals
        # of the variants it keeps); before applying, so a canary's marks are on the new ones.
        for name in route.names:
            self._stats.pop((route.model, name), None)
        self._apply(route, who, persist=True)
        return self.status(route.model)

    def clear(self, model: str, who: str) -> RouteStatus:
        self._require(model)
        self._apply_clear(model, who, persist=True)
        return RouteStatus(table=RouteTable(model=model),
                           persist_error=self._unsaved.pop(model, ""))

    def promote(self, model: str, who: str) -> RouteStatus:
        run = self._running_canary(model)
        self._advance(model, run, f"promoted by {who}")
        return self.status(model)

    def rollback(self, model: str, who: str) -> RouteStatus:
        run = self._running_canary(model)
        self._roll_back(model, run, f"rolled back by {who}")
        return self.status(model)

    def status(self, model: str) -> RouteStatus:
        route = self._require(model)
        variants = []
        for target in route.variants:
            stats = self._variant_stats(model, target.name)
            window = stats.since((0, 0, max(0, stats.mark()[2] - 4096)))
            variants.append(VariantStatus(
                name=target.name, model=target.model, version=target.version,
                weight=target.weight, requests=stats.requests, errors=stats.errors,
                p99_ms=window.p99_ms,
            ))
        figures = self._mirror.figures(model)
        status = RouteStatus(
            table=route.table, variants=tuple(variants),
            shadow=dataclasses.replace(figures) if figures is not None else None,
            persist_error=self._unsaved.get(model, ""),
        )
        run = self._canaries.get(model)
        if run is None:
            return status
        return dataclasses.replace(status, canary_state=run.state, canary_step=run.step,
                                   canary_reason=run.reason)

    def routes(self) -> list[str]:
        return sorted(self._routes)

    def has_route(self, model: str) -> bool:
        return model in self._routes

    async def close(self) -> None:
        for run in self._canaries.values():
            if run.task is not None:
                run.task.cancel()
        await asyncio.gather(*(r.task for r in self._canaries.values() if r.task),
                             return_exceptions=True)
        await self._mirror.close()

    # -- applying --------------------------------------------------------------------------------

    def _require(self, model: str) -> Route:
        route = self._routes.get(model)
        if route is None:
            raise NotAllowed(f"model '{model}' has no routing table")
        return route

    def _running_canary(self, model: str) -> CanaryRun:
        self._require(model)
        run = self._canaries.get(model)
        if run is None or run.state != "running":
            raise NotAllowed(f"model '{model}' has no running canary")
        return run

    def _apply(self, route: Route, who: str, persist: bool) -> None:
        if route.canary is not None:
            first = route.canary.steps[0]
            route = route.with_weights({route.canary.candidate: first,
                                        route.canary.baseline: 100.0 - first})
        self._install(route, who, "set", persist)
        old_run = self._canaries.pop(route.model, None)
        if old_run is not None and old_run.task is not None:
            old_run.task.cancel()
        if route.canary is None and old_run is not None and old_run.state == "running":
            self._metrics.forget_canary(route.model)  # replaced by a table without a canary
        if route.canary is not None:
            run = CanaryRun()
            self._mark(route, run)
            run.task = asyncio.get_running_loop().create_task(
                self._drive_canary(route.model, run), name=f"canary-{route.model}"
            )
            run.task.add_done_callback(self._canary_ended)
            self._canaries[route.model] = run
            self._metrics.set_canary(route.model, route.canary.steps[0])

    def _install(self, route: Route, who: str, action: str, persist: bool) -> None:
        model = route.model
        if persist:
            self._persist(model, lambda: self._store.write(route.table))
        else:
            self._unsaved.pop(model, None)  # applied from the file: memory and disk agree
        old = self._routes.get(model)
        self._routes[model] = route
        self._mirror.configure(model, route.shadow)
        if old is not None:
            self._forget_variants(model, set(old.names) - set(route.names))
        for target in route.variants:
            self._metrics.set_weight(route.model, target.name, target.weight)
        log.info("routing changed", extra={
            "who": who, "action": action, "model": route.model,
            "table": json.dumps(table_to_json(route.table)),
        })

    def _apply_clear(self, model: str, who: str, persist: bool) -> None:
        if persist:
            self._persist(model, lambda: self._store.remove(model))
        else:
            self._unsaved.pop(model, None)
        run = self._canaries.pop(model, None)
        if run is not None and run.task is not None:
            run.task.cancel()
        old = self._routes.pop(model, None)
        self._mirror.configure(model, None)
        if old is not None:
            self._forget_variants(model, old.names)
        self._metrics.forget_canary(model)
        log.info("routing changed", extra={"who": who, "action": "clear", "model": model})

    def _forget_variants(self, model: str, names: Iterable[str]) -> None:
        """Drop the live figures and the series of variants no longer in the table, so
        /metrics holds only the variants in force however often tables change."""
        for name in names:
            self._stats.pop((model, name), None)
            self._metrics.forget_variant(model, name)

    def _persist(self, model: str, write: Callable[[], None]) -> None:
        """Write a change to the routing file. A failure (a read-only repository, as the
        Kubernetes example mounts it) does not undo the change: routing (a rollback above
        all) must work whatever the disk does. The table holds in memory, and the failure is
        logged and reported in the model's RouteStatus until a later write succeeds."""
        try:
            write()
        except OSError as exc:
            self._unsaved[model] = (
                f"not persisted ({exc}): in force in memory only; a restart applies "
                f"{self._store.path(model)} as it is on disk"
            )
            log.error("routing change not persisted", extra={
                "model": model, "path": str(self._store.path(model)), "error": repr(exc),
            })
        else:
            self._unsaved.pop(model, None)

    # -- canary ------------------------------------------------------------------------------------

    def _mark(self, route: Route, run: CanaryRun) -> None:
        assert route.canary is not None
        run.started = time.monotonic()
        run.baseline_mark = self._variant_stats(route.model, route.canary.baseline).mark()
        run.candidate_mark = self._variant_stats(route.model, route.canary.candidate).mark()

    def _canary_ended(self, task: asyncio.Task[None]) -> None:
        """A canary driver that dies leaves the table as it is, and says so."""
        if task.cancelled() or task.exception() is None:
            return
        for model, run in self._canaries.items():
            if run.task is task:
                run.state = "failed"
                run.reason = f"canary driver failed: {task.exception()!r}"
                log.error("canary driver failed", extra={"model": model, "reason": run.reason})

    async def _drive_canary(self, model: str, run: CanaryRun) -> None:
        while run.state == "running":
            await asyncio.sleep(CANARY_TICK_SECS)
            route = self._routes.get(model)
            if route is None or route.canary is None:
                return
            spec = route.canary
            baseline = self._variant_stats(model, spec.baseline).since(run.baseline_mark)
            candidate = self._variant_stats(model, spec.candidate).since(run.candidate_mark)
            verdict = judge(spec, baseline, candidate, time.monotonic() - run.started)
            if verdict.action == "rollback":
                self._roll_back(model, run, verdict.reason)
            elif verdict.action == "advance":
                self._advance(model, run, verdict.reason)

    def _advance(self, model: str, run: CanaryRun, reason: str) -> None:
        route = self._routes[model]
        assert route.canary is not None
        spec = route.canary
        run.step += 1
        run.reason = reason
        if run.step >= len(spec.steps):
            run.step = len(spec.steps) - 1
            weights = {spec.candidate: 100.0, spec.baseline: 0.0}
        else:
            share = spec.steps[run.step]
            weights = {spec.candidate: share, spec.baseline: 100.0 - share}
        if weights[spec.candidate] >= 100.0:
            run.state = "promoted"
            self._install(route.finished(weights), "canary", "promote", persist=True)
        else:
            self._install(route.with_weights(weights), "canary", "advance", persist=True)
            self._mark(self._routes[model], run)
        self._metrics.set_canary(model, weights[spec.candidate])
        log.info("canary step", extra={"model": model, "state": run.state,
                                       "candidate_percent": weights[spec.candidate],
                                       "reason": reason})

    def _roll_back(self, model: str, run: CanaryRun, reason: str) -> None:
        route = self._routes[model]
        assert route.canary is not None
        spec = route.canary
        run.state = "rolled_back"
        run.reason = reason
        self._install(route.finished({spec.candidate: 0.0, spec.baseline: 100.0}),
                      "canary", "rollback", persist=True)
        self._metrics.set_canary(model, 0.0)
        log.warning("canary rolled back", extra={"model": model, "reason": reason})
