"""The catalog: an immutable snapshot of the repository's models, as readers see them.

The manager builds a new Catalog after every change and publishes it; the data plane and the
control plane only read snapshots, so a reader never sees half a change and never needs a lock.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from server._pb import model_config_pb2 as mc
from server.errors import (
    ModelNotFound,
    ModelNotReady,
    no_available_version,
    unknown_model,
    unknown_version,
    version_not_ready,
)
from server.interfaces import ResponseCache, Scheduler
from server.metrics import VersionMetrics
from server.spec import ModelSpec


class ModelState(enum.Enum):
    LOADING = "LOADING"
    READY = "READY"
    UNLOADING = "UNLOADING"
    UNAVAILABLE = "UNAVAILABLE"


@dataclass(frozen=True, slots=True)
class ServedVersion:
    """A ready model version: what the catalog's ``get`` returns (a LoadedModel)."""

    spec: ModelSpec
    version: str
    scheduler: Scheduler
    metrics: VersionMetrics
    #: Which backend, provider and device serve it (Backend.description).
    description: str
    #: The version's model card (where it came from), shown in ModelMetadata and ModelConfig.
    card: Mapping[str, str] = field(default_factory=dict)
    #: The version's share of the response cache; None when its model does not use one
    #: (then the data plane does no cache work for it at all).
    cache: ResponseCache | None = None


@dataclass(frozen=True, slots=True)
class VersionView:
    version: str
    state: ModelState
    reason: str = ""
    served: ServedVersion | None = None


@dataclass(frozen=True, slots=True)
class ModelView:
    name: str
    state: ModelState
    reason: str
    #: The completed config (what ModelConfig answers); None when it never parsed.
    config: mc.ModelConfig | None
    spec: ModelSpec | None
    versions: Mapping[str, VersionView]
    #: Ready versions, highest first: what an empty version request gets.
    ready_order: tuple[str, ...]

    def chosen(self, version: str) -> VersionView | None:
        """The requested version, or the one an empty request gets; None if there is none."""
        chosen = version or (self.ready_order[0] if self.ready_order else "")
        return self.versions.get(chosen)


@dataclass(frozen=True, slots=True)
class IndexEntry:
    name: str
    version: str
    state: str
    reason: str


class Catalog:
    """One snapshot. Implements ModelCatalog for the data plane; the control plane reads the
    rest. Built once per change, so ``get`` is two dictionary lookups on the hot path."""

    __slots__ = ("_latest", "_ready", "models")

    def __init__(self, models: Mapping[str, ModelView]) -> None:
        self.models: Mapping[str, ModelView] = MappingProxyType(dict(models))
        self._ready: dict[tuple[str, str], ServedVersion] = {}
        self._latest: dict[str, ServedVersion] = {}
        for name, model in self.models.items():
            for version, view in model.versions.items():
                if view.state is ModelState.READY and view.served is not None:
                    self._ready[(name, version)] = view.served
            if model.ready_order:
                self._latest[name] = self._ready[(name, model.ready_order[0])]

    def get(self, name: str, version: str) -> ServedVersion:
        served = self._ready.get((name, version)) if version else self._latest.get(name)
        if served is None:
            self._refuse(name, version)
        assert served is not None
        if not served.scheduler.healthy:
            raise version_not_ready(name, served.version, served.scheduler.problem)
        return served

    def _refuse(self, name: str, version: str) -> None:
        """Raise the error that says why (name, version) is not served (Triton's wording,
        server/errors.py)."""
        model = self.model(name)
        if not version:
            raise no_available_version(name, model.reason)
        view = model.versions.get(version)
        if view is None:
            raise unknown_version(name, version)
        raise version_not_ready(name, version, view.state.value + _reason(view.reason))

    def model(self, name: str) -> ModelView:
        model = self.models.get(name)
        if model is None:
            raise unknown_model(name)
        return model

    def version_of(self, name: str, version: str) -> ModelView:
        """The model, checking that ``version`` (if any) is one of its versions."""
        model = self.model(name)
        if version and version not in model.versions:
            raise unknown_version(name, version)
        return model

    def is_ready(self, name: str, version: str) -> bool:
        try:
            self.get(name, version)
        except (ModelNotFound, ModelNotReady):
            return False
        return True

    def all_ready(self) -> bool:
        return all(self.is_ready(name, "") for name, model in self.models.items()
                   if model.reason != "unloaded")

    def spec_of(self, name: str, version: str) -> ModelSpec:
        """The spec of a model whose version (or latest) is ready; for routing tables."""
        model = self.version_of(name, version)
        if not self.is_ready(name, version):
            raise ModelNotFound(
                f"model '{name}' version {version or '(latest)'} is not ready to serve"
            )
        if model.spec is None:
            raise ModelNotFound(f"model '{name}' is not loaded: {model.reason}")
        return model.spec

    def names(self) -> list[str]:
        return sorted(self.models)

    def served_versions(self) -> list[ServedVersion]:
        return [view.served for model in self.models.values()
                for view in model.versions.values() if view.served is not None]

    def index(self, ready_only: bool = False) -> list[IndexEntry]:
        """Every model and version the repository manages, by name then version."""
        entries: list[IndexEntry] = []
        for name in sorted(self.models):
            model = self.models[name]
            if not model.versions:
                if not ready_only:
                    entries.append(IndexEntry(name, "", model.state.value, model.reason))
                continue
            for version in sorted(model.versions, key=int):
                state, reason = _live_state(model.versions[version])
                if ready_only and state is not ModelState.READY:
                    continue
                entries.append(IndexEntry(name, version, state.value, reason))
        return entries


def _reason(reason: str) -> str:
    return f" ({reason})" if reason else ""


def _live_state(view: VersionView) -> tuple[ModelState, str]:
    """A version's state, and why: a ready version whose scheduler stopped serving (every
    instance quarantined, say) is UNAVAILABLE, with the scheduler's reason."""
    served = view.served
    if view.state is ModelState.READY and served is not None and not served.scheduler.healthy:
        return ModelState.UNAVAILABLE, served.scheduler.problem
    return view.state, view.reason


EMPTY = Catalog({})
