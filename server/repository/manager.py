"""Loads, swaps and unloads model versions, and serves them to the dataplane (ModelCatalog).

Every change follows one path: plan (parse config, pick versions) -> load the new versions
beside the serving ones -> warm up -> switch the pointers -> drain the replaced versions ->
unload them. A failed load or warm-up leaves what was serving in place.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import hashlib
import logging
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from google.protobuf import json_format

from server._pb import model_config_pb2 as mc
from server.errors import ModelLoadError, ModelNotFound, ModelNotReady
from server.interfaces import Backend, BackendFactory, ModelSource, Packer
from server.metrics import MetricsRegistry, VersionMetrics
from server.repository import config as config_io
from server.repository.cards import read_card
from server.repository.state import RepositoryState, StateFile
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


class ControlMode(enum.Enum):
    NONE = "none"
    POLL = "poll"
    EXPLICIT = "explicit"


@dataclass(slots=True)
class ServedVersion:
    """A ready model version: what ModelCatalog.get returns."""

    spec: ModelSpec
    version: str
    scheduler: DynamicBatcher
    metrics: VersionMetrics
    description: str
    card: Mapping[str, str] = field(default_factory=dict)


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
    config_fingerprint: str = ""
    version_fingerprints: dict[str, str] = field(default_factory=dict)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


@dataclass(frozen=True, slots=True)
class IndexEntry:
    name: str
    version: str
    state: str
    reason: str


@dataclass(frozen=True, slots=True)
class LoadPlan:
    config: mc.ModelConfig
    spec: ModelSpec
    versions: tuple[str, ...]
    config_fingerprint: str
    version_fingerprints: Mapping[str, str]
    cards: Mapping[str, Mapping[str, str]]


class ModelRepository:
    """The repository manager (write side) and the catalog (read side) in one object.

    The read side (``get``) runs on the event loop for every request and only reads dicts;
    every write happens on the loop too, so a request sees either the old pointer or the new.
    """

    def __init__(
        self,
        source: ModelSource,
        backends: Mapping[str, BackendFactory],
        packer: Packer,
        metrics: MetricsRegistry,
        load_threads: int = 4,
        state_file: Path | None = None,
        drain_timeout: float = 30.0,
    ) -> None:
        self.source = source
        self._backends = backends
        self._packer = packer
        self._metrics = metrics
        self._models: dict[str, ModelRecord] = {}
        self._loader = ThreadPoolExecutor(max_workers=load_threads, thread_name_prefix="load")
        self._state_file = StateFile(state_file)
        self._state = self._state_file.load()
        self._state_writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="state")
        self._drain_timeout = drain_timeout
        self._retiring: set[asyncio.Task[None]] = set()
        self._source_fingerprints: dict[str, str] = {}

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
        return all(record.state is ModelState.READY for record in self._models.values()
                   if record.reason != "unloaded")

    def record(self, name: str) -> ModelRecord:
        record = self._models.get(name)
        if record is None:
            raise ModelNotFound(f"unknown model '{name}'")
        return record

    def spec_of(self, name: str, version: str) -> ModelSpec:
        """The spec of a model whose version (or latest) is ready; for routing tables."""
        record = self.record(name)
        if version and version not in record.versions:
            raise ModelNotFound(f"unknown version '{version}' of model '{name}'")
        if not self.is_ready(name, version):
            raise ModelNotFound(
                f"model '{name}' version {version or '(latest)'} is not ready to serve"
            )
        if record.spec is None:
            raise ModelNotFound(f"model '{name}' is not loaded: {record.reason}")
        return record.spec

    def names(self) -> list[str]:
        return sorted(self._models)

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
        if not ready_only:
            known = set(self._models)
            try:
                offered = self.source.list()
            except ModelLoadError:
                offered = []
            entries.extend(
                IndexEntry(name, "", ModelState.UNAVAILABLE.value, "not loaded")
                for name in offered if name not in known
            )
            entries.sort(key=lambda e: (e.name, int(e.version) if e.version else -1))
        return entries

    # -- write side --------------------------------------------------------------------------

    async def start(self, mode: ControlMode, load_models: tuple[str, ...] = ()) -> None:
        """Load what the control mode says to load at start (and what the state file says)."""
        if mode is ControlMode.EXPLICIT:
            wanted = set(load_models) | self._state.explicit_models
            if "*" in wanted:
                wanted = set(await asyncio.to_thread(self.source.list))
        else:
            wanted = set(await asyncio.to_thread(self.source.list))
        await asyncio.gather(*(self._load_at_start(name) for name in sorted(wanted)))
        if mode is ControlMode.EXPLICIT:
            self._state.explicit_models = {n for n in wanted if n in self._models}
            self._save_state()

    async def _load_at_start(self, name: str) -> None:
        self._source_fingerprints[name] = await asyncio.to_thread(self.source.fingerprint, name)
        try:
            await self.load_model(name)
            return
        except (ModelLoadError, ModelNotFound):
            if self.is_ready(name, ""):
                return  # some versions serve; the index shows why the others do not
        fallback = tuple(str(v) for v in self._state.last_good.get(name, []))
        if fallback:
            log.warning("falling back to the last versions that served well",
                        extra={"model": name, "versions": ",".join(fallback)})
            record = self._models.get(name)
            failed = {} if record is None else {
                v: e.reason for v, e in record.versions.items()
                if e.state is ModelState.UNAVAILABLE and v not in fallback
            }
            with contextlib.suppress(ModelLoadError, ModelNotFound):
                await self.load_model(name, versions=fallback)
            # The fallback's reconcile dropped the versions it did not want: keep showing why
            # the policy's choice is not served.
            record = self._models.get(name)
            if record is not None:
                for version, reason in failed.items():
                    record.versions.setdefault(version, VersionEntry(
                        version, ModelState.UNAVAILABLE,
                        f"{reason} (serving the last good versions {list(fallback)} instead)",
                    ))

    async def load_model(
        self,
        name: str,
        config_override: str | None = None,
        versions: tuple[str, ...] | None = None,
    ) -> None:
        """Load or reload one model without dropping requests. Raises ModelLoadError when no
        version of the model is ready afterwards (an older one may still be serving)."""
        try:
            model_dir = await asyncio.to_thread(self.source.fetch, name)
        except ModelLoadError as exc:
            # A remote source (MLflow) fails here: unreachable, unknown alias, no model file.
            # Record why, so RepositoryIndex shows it; a serving version keeps serving.
            failed = self._models.setdefault(
                name, ModelRecord(name=name, state=ModelState.UNAVAILABLE)
            )
            if not failed.ready_order:
                failed.state = ModelState.UNAVAILABLE
                failed.reason = str(exc)
            self._load_failed(failed, "", str(exc))
            raise
        record = self._models.get(name)
        if record is None:
            record = self._models[name] = ModelRecord(name=name, state=ModelState.LOADING)
        async with record.lock:
            retired = await self._reconcile(record, model_dir, config_override, versions)
        for served in retired:
            self._retire_later(served)
        if record.state is not ModelState.READY:
            raise ModelLoadError(f"failed to load '{name}': {record.reason}")
        if record.reason:
            raise ModelLoadError(f"model '{name}' kept its serving versions: {record.reason}")

    async def unload_model(self, name: str, forget: bool = False) -> None:
        """Stop routing to every version of ``name``, let them finish, then unload them."""
        record = self.record(name)
        async with record.lock:
            retired = [e.served for e in record.versions.values() if e.served is not None]
            for entry in record.versions.values():
                entry.state = ModelState.UNLOADING
            record.ready_order = []
            record.state = ModelState.UNAVAILABLE
            record.reason = "unloaded"
            await asyncio.gather(*(self._retire(s) for s in retired))
            record.versions.clear()
            record.config_fingerprint = ""
            record.version_fingerprints.clear()
        if forget:
            self._models.pop(name, None)
            self._state.last_good.pop(name, None)
        self._save_state()

    def remember_explicit(self, name: str, loaded: bool) -> None:
        if loaded:
            self._state.explicit_models.add(name)
        else:
            self._state.explicit_models.discard(name)
        self._save_state()

    async def poll_once(self) -> None:
        """Apply what changed on disk: new, changed and removed models and versions."""
        on_disk = set(await asyncio.to_thread(self.source.list))
        for name in sorted(set(self._models) - on_disk):
            log.info("model removed from the repository", extra={"model": name})
            await self.unload_model(name, forget=True)
            self._source_fingerprints.pop(name, None)
        for name in sorted(on_disk):
            fingerprint = await asyncio.to_thread(self.source.fingerprint, name)
            if fingerprint == self._source_fingerprints.get(name):
                continue
            self._source_fingerprints[name] = fingerprint
            try:
                await self.load_model(name)
            except (ModelLoadError, ModelNotFound) as exc:
                log.warning("repository change not applied",
                            extra={"model": name, "reason": str(exc)})

    # -- planning and loading -----------------------------------------------------------------

    def _plan(
        self, model_dir: Path, config_override: str | None, versions: tuple[str, ...] | None
    ) -> LoadPlan:
        """Blocking: parse and validate the config, pick versions, auto-complete the spec."""
        if config_override is not None:
            config = mc.ModelConfig()
            try:
                json_format.Parse(config_override, config)
            except json_format.ParseError as exc:
                raise ModelLoadError(f"config override is not a valid ModelConfig: {exc}") \
                    from None
            config_text = config_override
        else:
            config = config_io.read_config(model_dir)
            config_text = str(config)
        spec = config_io.to_spec(config, model_dir)
        on_disk = [int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit()]
        if not on_disk:
            raise ModelLoadError(f"model '{spec.name}' has no numeric version directory")
        if versions is not None:
            chosen = sorted(int(v) for v in versions if int(v) in on_disk)
            if not chosen:
                raise ModelLoadError(f"versions {list(versions)} are no longer on disk")
        else:
            chosen = select_versions(config.version_policy, on_disk)
        factory = self._factory(spec)
        config_io.check_parameters(spec, factory.parameter_keys)
        # Complete the spec from the newest version whose model file is there: a half-copied
        # version then fails on its own (and shows why) while the others load.
        complete = [
            v for v in sorted(set(chosen) | set(on_disk), key=lambda v: (v in chosen, v))
            if (model_dir / str(v) / spec.default_model_filename).is_file()
        ]
        if not complete:
            raise ModelLoadError(
                f"model '{spec.name}' has no version directory holding "
                f"'{spec.default_model_filename}'"
            )
        # A version whose model file is there but unreadable (garbage, truncated) must fail
        # alone too: complete from the next one, and let the bad one fail in its own load.
        first_error: ModelLoadError | None = None
        for candidate in reversed(complete):
            try:
                spec = factory.complete_spec(spec, str(model_dir / str(candidate)))
                break
            except ModelLoadError as exc:
                first_error = first_error or exc
        else:
            assert first_error is not None
            raise first_error
        if not spec.inputs or not spec.outputs:
            raise ModelLoadError(f"model '{spec.name}' declares no inputs or no outputs")
        if config_override is None and not (model_dir / config_io.CONFIG_FILE).exists():
            spec = config_io.with_default_batching(spec)
        fingerprints = {str(v): _version_fingerprint(model_dir / str(v)) for v in chosen}
        cards: dict[str, Mapping[str, str]] = {}
        for v in chosen:
            try:
                cards[str(v)] = read_card(model_dir / str(v))
            except ModelLoadError as exc:
                cards[str(v)] = {"__error__": str(exc)}
        return LoadPlan(
            config=config,
            spec=spec,
            versions=tuple(str(v) for v in chosen),
            config_fingerprint=hashlib.sha256(config_text.encode()).hexdigest(),
            version_fingerprints=fingerprints,
            cards=cards,
        )

    async def _reconcile(
        self,
        record: ModelRecord,
        model_dir: Path,
        config_override: str | None,
        versions: tuple[str, ...] | None,
    ) -> list[ServedVersion]:
        """Bring one model in line with its plan; returns the versions to retire."""
        loop = asyncio.get_running_loop()
        try:
            plan = await loop.run_in_executor(
                self._loader, self._plan, model_dir, config_override, versions
            )
        except ModelLoadError as exc:
            self._load_failed(record, "", str(exc))
            if not record.ready_order:
                record.state = ModelState.UNAVAILABLE
            record.reason = str(exc)
            return []

        config_changed = plan.config_fingerprint != record.config_fingerprint
        to_load = [
            v for v in plan.versions
            if config_changed
            or v not in record.versions
            or record.versions[v].state is not ModelState.READY
            or record.version_fingerprints.get(v) != plan.version_fingerprints[v]
        ]
        for version in to_load:
            record.versions.setdefault(version, VersionEntry(version, ModelState.LOADING))
        results = await asyncio.gather(
            *(self._build_version(record.name, plan, v, model_dir / v) for v in to_load),
            return_exceptions=True,
        )
        retired: list[ServedVersion] = []
        failures: list[str] = []
        for version, result in zip(to_load, results, strict=True):
            entry = record.versions[version]
            if isinstance(result, ServedVersion):
                if entry.served is not None:
                    retired.append(entry.served)
                entry.served = result
                entry.state = ModelState.READY
                entry.reason = ""
                record.version_fingerprints[version] = plan.version_fingerprints[version]
                self._metrics.set_ready(record.name, version, True)
                log.info("model version ready", extra={
                    "model": record.name, "version": version,
                    "instances": result.spec.instance_count, "runtime": result.description,
                })
            else:
                reason = str(result)
                failures.append(f"version {version}: {reason}")
                self._load_failed(record, version, reason)
                if entry.served is not None:
                    entry.reason = f"reload failed, the previous load keeps serving: {reason}"
                else:
                    entry.state = ModelState.UNAVAILABLE
                    entry.reason = reason

        desired = set(plan.versions)
        if any(record.versions[v].state is ModelState.READY for v in desired):
            for version in [v for v in record.versions if v not in desired]:
                entry = record.versions.pop(version)
                record.version_fingerprints.pop(version, None)
                if entry.served is not None:
                    retired.append(entry.served)
            record.config = config_io.completed_config(plan.config, plan.spec)
            record.spec = plan.spec
            record.config_fingerprint = plan.config_fingerprint
            self._state.last_good[record.name] = sorted(
                int(v) for v in desired if record.versions[v].state is ModelState.READY
            )
            self._save_state()
        elif record.spec is None:
            record.spec = plan.spec
            record.config = config_io.completed_config(plan.config, plan.spec)
        record.ready_order = sorted(
            (v for v, e in record.versions.items() if e.state is ModelState.READY),
            key=int, reverse=True,
        )
        record.state = ModelState.READY if record.ready_order else ModelState.UNAVAILABLE
        record.reason = "; ".join(failures)
        if not record.ready_order and not failures:
            record.reason = "no version could be loaded"
        return retired

    async def _build_version(
        self, name: str, plan: LoadPlan, version: str, version_dir: Path
    ) -> ServedVersion:
        card = plan.cards.get(version, {})
        if "__error__" in card:
            raise ModelLoadError(card["__error__"])
        loop = asyncio.get_running_loop()
        instances = await loop.run_in_executor(
            self._loader, self._instantiate, plan.spec, version_dir
        )
        metrics = self._metrics.version(name, version)
        scheduler = DynamicBatcher(plan.spec, version, instances, self._packer, metrics)
        return ServedVersion(
            spec=plan.spec, version=version, scheduler=scheduler, metrics=metrics,
            description=instances[0].description, card=card,
        )

    def _factory(self, spec: ModelSpec) -> BackendFactory:
        factory = self._backends.get(spec.backend)
        if factory is None:
            raise ModelLoadError(
                f"model '{spec.name}': backend '{spec.backend}' is not available; "
                f"installed: {sorted(self._backends)}"
            )
        return factory

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

    def _load_failed(self, record: ModelRecord, version: str, reason: str) -> None:
        self._metrics.load_failed(record.name, version)
        log.error("model failed to load",
                  extra={"model": record.name, "version": version, "reason": reason})

    # -- retiring ------------------------------------------------------------------------------

    def _retire_later(self, served: ServedVersion) -> None:
        task = asyncio.get_running_loop().create_task(self._retire(served))
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    async def _retire(self, served: ServedVersion) -> None:
        """Drain a replaced version (it takes no new requests) and unload it."""
        name, version = served.spec.name, served.version
        if not self.is_ready(name, version):
            self._metrics.set_ready(name, version, False)
        finished = await served.scheduler.drain(self._drain_timeout)
        await served.scheduler.close()
        log.info("model version unloaded", extra={
            "model": name, "version": version, "drained": finished,
        })

    async def close(self, grace: float) -> None:
        """Drain every version (up to ``grace`` seconds), then unload it."""
        served = self.served_versions()
        await asyncio.gather(*(s.scheduler.drain(grace) for s in served))
        await asyncio.gather(*(s.scheduler.close() for s in served))
        await asyncio.gather(*self._retiring, return_exceptions=True)
        for record in self._models.values():
            for entry in record.versions.values():
                entry.served = None
                entry.state = ModelState.UNAVAILABLE
                entry.reason = "server shutting down"
            record.ready_order = []
        self._loader.shutdown(wait=False)
        await asyncio.to_thread(self._state_writer.shutdown, True)

    def _save_state(self) -> None:
        """Persist a snapshot from the writer thread: fsync stays off the event loop, and one
        thread keeps the writes in order."""
        snapshot = RepositoryState(
            explicit_models=set(self._state.explicit_models),
            last_good={name: list(versions) for name, versions in self._state.last_good.items()},
        )
        self._state_writer.submit(self._state_file.save, snapshot)


def _version_fingerprint(version_dir: Path) -> str:
    digest = hashlib.sha256()
    try:
        for path in sorted(version_dir.rglob("*")):
            if path.is_file():
                stat = path.stat()
                digest.update(f"{path.name}:{stat.st_size}:{stat.st_mtime_ns};".encode())
    except OSError:
        pass
    return digest.hexdigest()
