"""Routing tables: what an operator asks for (plain data, as the admin API and the routing file
carry it), validated into frozen routes the router can use."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass

from server.errors import InvalidInput, ModelNotFound
from server.spec import ModelSpec

DEFAULT_STICKY_PARAMETER = "routing_key"
DEFAULT_SHADOW_PENDING = 256
DEFAULT_SHADOW_PENDING_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class Variant:
    """One destination: a version of the model (empty: its latest ready one), or another
    model (empty: the routed model itself) with the same inputs and outputs."""

    name: str
    model: str = ""
    version: str = ""
    weight: float = 0.0


@dataclass(frozen=True, slots=True)
class Shadow:
    target: Variant
    #: Share of primary traffic mirrored, 0..1 (0 means 1: everything).
    fraction: float = 0.0
    #: Copies waiting at most (0 means DEFAULT_SHADOW_PENDING).
    max_pending: int = 0
    #: Bytes the waiting copies may hold at most: their inputs and the primary outputs kept
    #: for the comparison (0 means DEFAULT_SHADOW_PENDING_BYTES).
    max_pending_bytes: int = 0


@dataclass(frozen=True, slots=True)
class Canary:
    """A rollout plan; zeros mean the defaults that ``build_route`` fills in."""

    baseline: str
    candidate: str
    steps: tuple[float, ...] = ()
    step_interval_secs: float = 0.0
    max_error_rate_increase: float = 0.0
    max_p99_ratio: float = 0.0
    min_requests: int = 0


@dataclass(frozen=True, slots=True)
class RouteTable:
    """A model's routing table as an operator sets it."""

    model: str
    variants: tuple[Variant, ...] = ()
    shadow: Shadow | None = None
    canary: Canary | None = None
    #: Request parameter holding the sticky key (empty: DEFAULT_STICKY_PARAMETER).
    sticky_parameter: str = ""


@dataclass(frozen=True, slots=True)
class Target:
    name: str
    model: str
    version: str
    weight: float


@dataclass(frozen=True, slots=True)
class ShadowSpec:
    target: Target
    fraction: float
    max_pending: int
    max_pending_bytes: int


@dataclass(frozen=True, slots=True)
class CanarySpec:
    baseline: str
    candidate: str
    steps: tuple[float, ...]
    step_interval_secs: float
    max_error_rate_increase: float
    max_p99_ratio: float
    min_requests: int


@dataclass(frozen=True, slots=True)
class Route:
    model: str
    variants: tuple[Target, ...]
    cumulative: tuple[float, ...]
    sticky_parameter: str
    shadow: ShadowSpec | None
    canary: CanarySpec | None
    table: RouteTable

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(v.name for v in self.variants)

    @property
    def weights(self) -> tuple[float, ...]:
        return tuple(v.weight for v in self.variants)

    def with_weights(self, weights: dict[str, float]) -> Route:
        """The same route with some variants' weights changed (canary steps, rollback)."""
        table = dataclasses.replace(self.table, variants=tuple(
            dataclasses.replace(v, weight=weights.get(v.name, v.weight))
            for v in self.table.variants
        ))
        variants = tuple(
            Target(v.name, v.model, v.version, weights.get(v.name, v.weight))
            for v in self.variants
        )
        return Route(
            model=self.model, variants=variants, cumulative=_cumulative(variants),
            sticky_parameter=self.sticky_parameter, shadow=self.shadow, canary=self.canary,
            table=table,
        )


    def finished(self, weights: dict[str, float]) -> Route:
        """Final weights of a canary that ended: the table persists without its plan, so a
        restart does not start the rollout again."""
        done = self.with_weights(weights)
        return dataclasses.replace(done, canary=None,
                                   table=dataclasses.replace(done.table, canary=None))


def _cumulative(variants: tuple[Target, ...]) -> tuple[float, ...]:
    total = 0.0
    running = []
    for variant in variants:
        total += variant.weight
        running.append(total)
    return tuple(running)


#: Looks up the spec of (model, version) as the repository has it; raises ModelNotFound.
SpecLookup = Callable[[str, str], ModelSpec]


def _signature(spec: ModelSpec) -> tuple[object, ...]:
    return (
        spec.max_batch_size > 0,
        tuple((t.name, t.datatype, t.dims) for t in spec.client_inputs),
        tuple((t.name, t.datatype, t.dims) for t in spec.outputs),
    )


def _target(table_model: str, variant: Variant, where: str, lookup: SpecLookup,
            signature: tuple[object, ...]) -> Target:
    model = variant.model or table_model
    try:
        spec = lookup(model, variant.version)
    except ModelNotFound as exc:
        raise InvalidInput(f"{where}: {exc.message}") from None
    if _signature(spec) != signature:
        raise InvalidInput(
            f"{where}: model '{model}' does not have the inputs and outputs of '{table_model}'"
        )
    if not math.isfinite(variant.weight) or variant.weight < 0:
        raise InvalidInput(f"{where}: weight must be a finite number >= 0, got {variant.weight}")
    return Target(variant.name, model, variant.version, float(variant.weight))


def build_route(table: RouteTable, lookup: SpecLookup) -> Route:
    """Validate ``table`` against the repository; InvalidInput names what is wrong."""
    if not table.model:
        raise InvalidInput("routing table names no model")
    try:
        primary = lookup(table.model, "")
    except ModelNotFound as exc:
        raise InvalidInput(f"routing table: {exc.message}") from None
    signature = _signature(primary)
    if not table.variants:
        raise InvalidInput(f"routing table of '{table.model}' has no variants")
    variants: list[Target] = []
    for index, variant in enumerate(table.variants):
        if not variant.name:
            raise InvalidInput(f"variant {index} of '{table.model}' has no name")
        if any(v.name == variant.name for v in variants):
            raise InvalidInput(f"variant name '{variant.name}' appears twice")
        variants.append(_target(table.model, variant, f"variant '{variant.name}'", lookup,
                                signature))
    canary = _canary(table, variants)
    if canary is None and sum(v.weight for v in variants) <= 0:
        raise InvalidInput(f"routing table of '{table.model}': weights add up to 0")
    shadow = None
    if table.shadow is not None:
        fraction = table.shadow.fraction or 1.0
        if not 0 < fraction <= 1:
            raise InvalidInput(f"shadow fraction must be within (0, 1], got {fraction}")
        for name in ("max_pending", "max_pending_bytes"):
            if getattr(table.shadow, name) < 0:
                raise InvalidInput(f"shadow {name} must be >= 0, got "
                                   f"{getattr(table.shadow, name)}")
        shadow = ShadowSpec(
            target=_target(table.model, table.shadow.target, "shadow", lookup, signature),
            fraction=fraction,
            max_pending=table.shadow.max_pending or DEFAULT_SHADOW_PENDING,
            max_pending_bytes=table.shadow.max_pending_bytes or DEFAULT_SHADOW_PENDING_BYTES,
        )
    frozen = tuple(variants)
    route = Route(
        model=table.model, variants=frozen, cumulative=_cumulative(frozen),
        sticky_parameter=table.sticky_parameter or DEFAULT_STICKY_PARAMETER,
        shadow=shadow, canary=canary, table=table,
    )
    return route


def _canary(table: RouteTable, variants: list[Target]) -> CanarySpec | None:
    spec = table.canary
    if spec is None:
        return None
    names = {v.name for v in variants}
    for role, name in (("baseline", spec.baseline), ("candidate", spec.candidate)):
        if name not in names:
            raise InvalidInput(f"canary {role} '{name}' is not a variant of the table")
    if spec.baseline == spec.candidate:
        raise InvalidInput("canary baseline and candidate must differ")
    steps = tuple(float(s) for s in spec.steps) or (1.0, 10.0, 50.0, 100.0)
    if any(not 0 < s <= 100 for s in steps) or list(steps) != sorted(set(steps)):
        raise InvalidInput(f"canary steps must rise within (0, 100], got {list(steps)}")
    interval = spec.step_interval_secs or 60.0
    if not (math.isfinite(interval) and interval > 0):
        raise InvalidInput(f"canary step_interval_secs must be positive, got {interval}")
    ratio = spec.max_p99_ratio or 1.5
    if not (math.isfinite(ratio) and ratio >= 1):
        raise InvalidInput(f"canary max_p99_ratio must be at least 1, got {ratio}")
    increase = spec.max_error_rate_increase or 0.01
    if not 0 <= increase <= 1:
        raise InvalidInput("canary max_error_rate_increase must be within [0, 1]")
    return CanarySpec(
        baseline=spec.baseline, candidate=spec.candidate, steps=steps,
        step_interval_secs=interval, max_error_rate_increase=increase, max_p99_ratio=ratio,
        min_requests=max(0, spec.min_requests) or 20,
    )
