"""The control plane: what operators and clients ask of the server other than inference.

One service over the repository manager (and its catalog snapshots), the router and drift
monitoring, used by every servicer: readiness, index, metadata, config, statistics, load and
unload, routing tables and drift reports. It takes and returns plain types; the servicers
translate protobuf. Runs on the event loop thread.

Every method that takes a model name checks it first (server/security/names.py): a name that
could be a path answers INVALID_ARGUMENT before anything looks it up or touches the disk.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from server._pb import model_config_pb2 as mc
from server.errors import (
    InvalidInput,
    ModelLoadError,
    ModelNotFound,
    NotAllowed,
    load_failed,
    no_available_version,
    not_in_repository,
)
from server.metrics.statistics import VersionStats
from server.repository.cards import RUNTIME
from server.repository.catalog import IndexEntry, ModelState, ModelView
from server.repository.manager import ControlMode, ModelManager
from server.repository.override import parse_override
from server.routing.router import Router, RouteStatus
from server.routing.table import RouteTable
from server.security.names import check_model_name
from server.tracing.settings import TraceSettings
from server.types import DataType

if TYPE_CHECKING:
    from server.drift.detect import WindowReport

#: The only RepositoryModelLoad parameter: a whole ModelConfig as JSON.
CONFIG_OVERRIDE_PARAMETER = "config"


@dataclass(frozen=True, slots=True)
class TensorInfo:
    name: str
    datatype: DataType
    #: -1 for a variable dimension, the batch dimension included.
    shape: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class ModelMetadata:
    name: str
    versions: tuple[str, ...]
    platform: str
    inputs: tuple[TensorInfo, ...]
    outputs: tuple[TensorInfo, ...]
    #: The model card of the version asked about (or the one an empty version request gets).
    properties: Mapping[str, str]


@dataclass(frozen=True, slots=True)
class VersionStatistics:
    name: str
    version: str
    stats: VersionStats


class ControlPlane:
    def __init__(
        self,
        manager: ModelManager,
        router: Router,
        mode: ControlMode,
        drift_reports: Callable[[], list[WindowReport]] | None = None,
        tracing: TraceSettings | None = None,
    ) -> None:
        self._manager = manager
        self._router = router
        self._mode = mode
        self._drift_reports = drift_reports
        #: What TraceSetting reads and changes (without --trace-config: level OFF, fixed).
        self._tracing = tracing if tracing is not None else TraceSettings(None)

    # -- readiness and the index -----------------------------------------------------------------

    def model_ready(self, name: str, version: str) -> bool:
        check_model_name(name)
        return self._manager.catalog.is_ready(name, version)

    def all_models_ready(self) -> bool:
        return self._manager.catalog.all_ready()

    async def index(self, ready_only: bool) -> list[IndexEntry]:
        """Every managed model and version; unless ``ready_only``, also the models the source
        offers that were never loaded."""
        entries = self._manager.catalog.index(ready_only)
        if ready_only:
            return entries
        offered = await asyncio.to_thread(self._manager.unloaded_names)
        entries.extend(IndexEntry(name, "", ModelState.UNAVAILABLE.value, "not loaded")
                       for name in offered)
        entries.sort(key=lambda e: (e.name, int(e.version) if e.version else -1))
        return entries

    # -- what a model is -----------------------------------------------------------------------

    def _loaded(self, name: str, version: str) -> ModelView:
        check_model_name(name)
        model = self._manager.catalog.version_of(name, version)
        if model.spec is None or model.config is None:
            raise no_available_version(name, f"it failed to load: {model.reason}", ModelNotFound)
        return model

    def metadata(self, name: str, version: str) -> ModelMetadata:
        model = self._loaded(name, version)
        spec = model.spec
        assert spec is not None
        batch = (-1,) if spec.batches else ()
        return ModelMetadata(
            name=spec.name,
            versions=tuple(sorted(model.versions, key=int)),
            platform=spec.platform,
            inputs=tuple(TensorInfo(t.name, t.datatype, (*batch, *t.dims))
                         for t in spec.client_inputs),
            outputs=tuple(TensorInfo(t.name, t.datatype, (*batch, *t.dims))
                          for t in spec.outputs),
            properties=_card(model, version),
        )

    def config(self, name: str, version: str) -> mc.ModelConfig:
        """The completed config, with the version's model card and runtime as parameters.
        A copy whenever it differs from the catalog's (which readers share)."""
        model = self._loaded(name, version)
        assert model.config is not None
        extra = _card(model, version)
        chosen = model.chosen(version)
        if chosen is not None and chosen.served is not None and chosen.served.description:
            extra[RUNTIME.name] = chosen.served.description
        if not extra:
            return model.config
        config = mc.ModelConfig()
        config.CopyFrom(model.config)
        for key, value in extra.items():
            config.parameters[key].string_value = value
        return config

    def statistics(self, name: str, version: str) -> list[VersionStatistics]:
        """Of every served version, of one model's, or of one version."""
        catalog = self._manager.catalog
        served = catalog.served_versions()
        if name:
            check_model_name(name)
            catalog.version_of(name, version)
            served = [s for s in served
                      if s.spec.name == name and (not version or s.version == version)]
        return [VersionStatistics(s.spec.name, s.version, s.metrics.stats)
                for s in sorted(served, key=lambda s: (s.spec.name, int(s.version)))]

    # -- lifecycle (explicit mode) ---------------------------------------------------------------

    def _check_explicit(self, action: str) -> None:
        if self._mode is not ControlMode.EXPLICIT:
            raise NotAllowed(
                f"{action} needs --model-control-mode explicit; this server runs in "
                f"'{self._mode.value}' mode"
            )

    async def load(self, name: str, parameters: Mapping[str, str]) -> None:
        """Load or reload ``name``; the only parameter is a config override (JSON)."""
        check_model_name(name)
        self._check_explicit("RepositoryModelLoad")
        override: mc.ModelConfig | None = None
        for key, value in parameters.items():
            if key != CONFIG_OVERRIDE_PARAMETER:
                raise InvalidInput(
                    f"Unrecognized load parameter '{key}' (only "
                    f"'{CONFIG_OVERRIDE_PARAMETER}', a ModelConfig as JSON, is supported)"
                )
            override = parse_override(value)
        try:
            await self._manager.load_model(name, config_override=override, explicit=True)
        except ModelNotFound as exc:
            raise not_in_repository(name, exc.message) from None
        except ModelLoadError as exc:
            raise load_failed(name, str(exc)) from None

    async def unload(self, name: str) -> None:
        check_model_name(name)
        self._check_explicit("RepositoryModelUnload")
        await self._manager.unload_model(name, explicit=True)

    # -- routing ---------------------------------------------------------------------------------

    def set_route(self, table: RouteTable, who: str) -> RouteStatus:
        check_model_name(table.model)
        targets = [v.model for v in table.variants]
        if table.shadow is not None:
            targets.append(table.shadow.target.model)
        for model in targets:
            if model:  # empty: the routed model itself
                check_model_name(model)
        return self._router.set_table(table, who)

    def clear_route(self, model: str, who: str) -> RouteStatus:
        check_model_name(model)
        return self._router.clear(model, who)

    def route(self, model: str) -> RouteStatus:
        check_model_name(model)
        return self._router.status(model)

    def routes(self) -> list[RouteStatus]:
        return [self._router.status(model) for model in self._router.routes()]

    def promote(self, model: str, who: str) -> RouteStatus:
        check_model_name(model)
        return self._router.promote(model, who)

    def rollback(self, model: str, who: str) -> RouteStatus:
        check_model_name(model)
        return self._router.rollback(model, who)

    # -- drift -----------------------------------------------------------------------------------

    def drift_reports(self, model: str, version: str) -> list[WindowReport]:
        """The latest window reports, of every model or one model (and version)."""
        if model:
            check_model_name(model)
        if self._drift_reports is None:
            raise NotAllowed("drift monitoring is not running: no model loaded at start sets "
                             "drift_sample_rate")
        reports = [
            r for r in self._drift_reports()
            if (not model or r.model == model) and (not version or r.version == version)
        ]
        reports.sort(key=lambda r: (r.model, int(r.version), r.window))
        return reports

    # -- tracing ---------------------------------------------------------------------------------

    def trace_settings(self, model: str, changes: Mapping[str, Sequence[str]]
                       ) -> dict[str, list[str]]:
        """Triton's TraceSetting: apply ``changes`` (none: only read) and answer the settings
        in effect. There are global settings only: a model reads them too."""
        if model:
            check_model_name(model)
        self._tracing.update(model, changes)
        return self._tracing.report()


def _card(model: ModelView, version: str) -> dict[str, str]:
    """The model card of the requested version, or of the version an empty request gets."""
    chosen = model.chosen(version)
    if chosen is None or chosen.served is None:
        return {}
    return dict(chosen.served.card)
