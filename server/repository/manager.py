"""Loads the repository's models and serves them to the dataplane (the ModelCatalog)."""

from __future__ import annotations

import asyncio
import enum
import logging
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from server._pb import model_config_pb2 as mc
from server.errors import ModelLoadError, ModelNotFound, ModelNotReady
from server.interfaces import Backend, BackendFactory, Packer
from server.metrics import MetricsRegistry, VersionMetrics
from server.repository import config as config_io
from server.repository.versions import select_versions
from server.repository.warmup import warmup_inputs
from server.scheduler.batcher import DynamicBatcher
from server.spec import ModelSpec

log = logging.getLogger(__name__)


class ModelState(enum.Enum):
    LOADING = "LOADING"
    READY = "READY"
    UNLOADING = "UNLOADING"
    UNAVAILABLE = "UNAVAILABLE"


@dataclass(slots=True)
class ServedVersion:
    """A ready model version: what ModelCatalog.get returns."""

    spec: ModelSpec
    version: str
    scheduler: DynamicBatcher
    metrics: VersionMetrics
    description: str


@dataclass(slots=True)
class VersionEntry:
    version: str
    state: ModelState
    reason: str = ""
    served: ServedVersion | None = None


@dataclass(slots=True)
class ModelRecord:
    name: str
    state: ModelState
    reason: str = ""
    config: mc.ModelConfig | None = None
    spec: ModelSpec | None = None
    versions: dict[str, VersionEntry] = field(default_factory=dict)
    #: Ready versions, highest first: what an empty version request gets.
    ready_order: list[str] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class IndexEntry:
    name: str
    version: str
    state: str
    reason: str


class ModelRepository:
    """The repository manager (write side) and the catalog (read side) in one object.

    The read side (``get``) is called on the event loop for every request and only reads dicts.
    """

    def __init__(
        self,
        root: Path,
        backends: Mapping[str, BackendFactory],
        packer: Packer,
        metrics: MetricsRegistry,
        load_threads: int = 4,
    ) -> None:
        self.root = root
        self._backends = backends
        self._packer = packer
        self._metrics = metrics
        self._models: dict[str, ModelRecord] = {}
        self._loader = ThreadPoolExecutor(max_workers=load_threads, thread_name_prefix="load")

    # -- read side ---------------------------------------------------------------------------

    def get(self, name: str, version: str) -> ServedVersion:
        record = self._models.get(name)
        if record is None:
            raise ModelNotFound(f"unknown model '{name}'")
        if not version:
            if not record.ready_order:
                reason = f": {record.reason}" if record.reason else ""
                raise ModelNotReady(f"model '{name}' has no ready version{reason}")
            version = record.ready_order[0]
        entry = record.versions.get(version)
        if entry is None:
            raise ModelNotFound(f"unknown version '{version}' of model '{name}'")
        if entry.state is not ModelState.READY or entry.served is None:
            reason = f": {entry.reason}" if entry.reason else ""
            raise ModelNotReady(
                f"model '{name}' version {version} is {entry.state.value}{reason}"
            )
        if not entry.served.scheduler.healthy:
            raise ModelNotReady(f"model '{name}' version {version} lost its batcher")
        return entry.served

    def is_ready(self, name: str, version: str) -> bool:
        try:
            self.get(name, version)
        except (ModelNotFound, ModelNotReady):
            return False
        return True

    def all_ready(self) -> bool:
        return all(record.state is ModelState.READY for record in self._models.values())

    def record(self, name: str) -> ModelRecord:
        record = self._models.get(name)
        if record is None:
            raise ModelNotFound(f"unknown model '{name}'")
        return record

    def served_versions(self) -> list[ServedVersion]:
        return [
            entry.served
            for record in self._models.values()
            for entry in record.versions.values()
            if entry.served is not None
        ]

    def index(self, ready_only: bool = False) -> list[IndexEntry]:
        entries: list[IndexEntry] = []
        for name in sorted(self._models):
            record = self._models[name]
            if not record.versions:
                if not ready_only:
                    entries.append(IndexEntry(name, "", record.state.value, record.reason))
                continue
            for version in sorted(record.versions, key=int):
                entry = record.versions[version]
                if ready_only and entry.state is not ModelState.READY:
                    continue
                entries.append(IndexEntry(name, version, entry.state.value, entry.reason))
        return entries

    # -- write side --------------------------------------------------------------------------

    def discover(self) -> list[str]:
        if not self.root.is_dir():
            raise ModelLoadError(f"model repository '{self.root}' is not a directory")
        return sorted(
            p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".")
        )

    async def load_all(self) -> None:
        names = self.discover()
        for name in names:
            self._models[name] = ModelRecord(name=name, state=ModelState.LOADING)
        await asyncio.gather(*(self._load_model(name) for name in names))

    async def _load_model(self, name: str) -> None:
        record = self._models[name]
        model_dir = self.root / name
        loop = asyncio.get_running_loop()
        try:
            config, spec, versions = await loop.run_in_executor(
                self._loader, self._prepare, model_dir
            )
        except ModelLoadError as exc:
            self._mark_failed(record, str(exc))
            return
        record.config = config_io.completed_config(config, spec)
        record.spec = spec
        for version in versions:
            record.versions[str(version)] = VersionEntry(str(version), ModelState.LOADING)
        await asyncio.gather(
            *(self._load_version(record, spec, str(v)) for v in versions)
        )
        ready = [v for v, e in record.versions.items() if e.state is ModelState.READY]
        record.ready_order = sorted(ready, key=int, reverse=True)
        if ready:
            record.state = ModelState.READY
            record.reason = ""
        else:
            record.state = ModelState.UNAVAILABLE
            record.reason = "no version could be loaded"

    def _prepare(self, model_dir: Path) -> tuple[mc.ModelConfig, ModelSpec, list[int]]:
        """Blocking: parse and validate the config, pick versions, auto-complete the spec."""
        config = config_io.read_config(model_dir)
        spec = config_io.to_spec(config, model_dir)
        on_disk = [int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit()]
        if not on_disk:
            raise ModelLoadError(f"model '{spec.name}' has no numeric version directory")
        versions = select_versions(config.version_policy, on_disk)
        factory = self._factory(spec)
        spec = factory.complete_spec(spec, str(model_dir / str(versions[-1])))
        if not spec.inputs or not spec.outputs:
            raise ModelLoadError(f"model '{spec.name}' declares no inputs or no outputs")
        return config, spec, versions

    def _factory(self, spec: ModelSpec) -> BackendFactory:
        factory = self._backends.get(spec.backend)
        if factory is None:
            raise ModelLoadError(
                f"model '{spec.name}': backend '{spec.backend}' is not available; "
                f"installed: {sorted(self._backends)}"
            )
        return factory

    async def _load_version(self, record: ModelRecord, spec: ModelSpec, version: str) -> None:
        entry = record.versions[version]
        version_dir = self.root / record.name / version
        loop = asyncio.get_running_loop()
        try:
            instances = await loop.run_in_executor(
                self._loader, self._instantiate, spec, version_dir
            )
        except ModelLoadError as exc:
            entry.state = ModelState.UNAVAILABLE
            entry.reason = str(exc)
            log.error("model version failed to load",
                      extra={"model": record.name, "version": version, "reason": str(exc)})
            self._metrics.set_ready(record.name, version, False)
            return
        metrics = self._metrics.version(record.name, version)
        scheduler = DynamicBatcher(spec, version, instances, self._packer, metrics)
        entry.served = ServedVersion(
            spec=spec, version=version, scheduler=scheduler, metrics=metrics,
            description=instances[0].description,
        )
        entry.state = ModelState.READY
        entry.reason = ""
        self._metrics.set_ready(record.name, version, True)
        log.info("model version ready", extra={
            "model": record.name, "version": version, "instances": len(instances),
            "runtime": instances[0].description,
        })

    def _instantiate(self, spec: ModelSpec, version_dir: Path) -> list[Backend]:
        """Blocking: load every instance of one version and run its warm-up."""
        factory = self._factory(spec)
        instances: list[Backend] = []
        try:
            for index in range(spec.instance_count):
                instances.append(factory.load(spec, str(version_dir), index))
            for warm in spec.warmup:
                inputs = warmup_inputs(spec, warm, version_dir.parent)
                for instance in instances:
                    for _ in range(warm.count):
                        instance.warmup(inputs)
        except ModelLoadError:
            for instance in instances:
                instance.close()
            raise
        except Exception as exc:
            for instance in instances:
                instance.close()
            raise ModelLoadError(f"warm-up failed: {exc}") from exc
        return instances

    def _mark_failed(self, record: ModelRecord, reason: str) -> None:
        record.state = ModelState.UNAVAILABLE
        record.reason = reason
        log.error("model failed to load", extra={"model": record.name, "reason": reason})

    async def close(self, grace: float) -> None:
        """Drain every version (up to ``grace`` seconds), then unload it."""
        served = self.served_versions()
        await asyncio.gather(*(s.scheduler.drain(grace) for s in served))
        await asyncio.gather(*(s.scheduler.close() for s in served))
        for record in self._models.values():
            for entry in record.versions.values():
                entry.served = None
                entry.state = ModelState.UNAVAILABLE
                entry.reason = "server shutting down"
            record.ready_order = []
        self._loader.shutdown(wait=False)
