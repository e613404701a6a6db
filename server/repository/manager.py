"""The repository manager: loads, swaps and unloads model versions, persists what it chose,
and publishes a catalog snapshot after every change (the write side; readers hold snapshots).

Every change follows one path: plan (parse config, pick versions) -> load the new versions
beside the serving ones -> warm up -> switch the pointers -> drain the replaced versions ->
unload them. A failed load or warm-up leaves what was serving in place.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import enum
import hashlib
import logging
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from server._pb import model_config_pb2 as mc
from server.errors import InvalidInput, ModelLoadError, ModelNotFound, unknown_model
from server.interfaces import (
    Backend,
    BackendFactory,
    ModelSource,
    ResponseCacheFactory,
    SchedulerFactory,
)
from server.metrics import MetricsRegistry
from server.parameters import Key, ModelCheck
from server.repository import model_config as config_io
from server.repository.cards import read_card
from server.repository.catalog import (
    EMPTY,
    Catalog,
    ModelState,
    ModelView,
    ServedVersion,
    VersionView,
)
from server.repository.labels import with_labels
from server.repository.state_file import RepositoryState, StateFile
from server.repository.versions import select_versions
from server.repository.warmup import warmup_inputs
from server.security.names import check_model_name
from server.security.paths import confined, hide_paths
from server.spec import ModelSpec

log = logging.getLogger(__name__)


class ControlMode(enum.Enum):
    NONE = "none"
    POLL = "poll"
    EXPLICIT = "explicit"


@dataclass(slots=True)
class VersionEntry:
    version: str
    state: ModelState
    reason: str = ""
    served: ServedVersion | None = None


@dataclass(slots=True)
class ModelRecord:
    """The manager's own, mutable view of one model; readers get ModelView snapshots."""

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

    def view(self) -> ModelView:
        return ModelView(
            name=self.name, state=self.state, reason=self.reason, config=self.config,
            spec=self.spec,
            versions={v: VersionView(v, e.state, e.reason, e.served)
                      for v, e in self.versions.items()},
            ready_order=tuple(self.ready_order),
        )


@dataclass(frozen=True, slots=True)
class LoadPlan:
    config: mc.ModelConfig
    spec: ModelSpec
    versions: tuple[str, ...]
    config_fingerprint: str
    version_fingerprints: Mapping[str, str]
    cards: Mapping[str, Mapping[str, str]]


#: Told of every new catalog snapshot (on the event loop thread).
CatalogSubscriber = Callable[[Catalog], None]


class ModelManager:
    """Owns the models' lifecycle. Every method runs on the event loop (blocking work goes to
    its loader threads), so a published snapshot is always a consistent state."""

    def __init__(
        self,
        source: ModelSource,
        backends: Mapping[str, BackendFactory],
        scheduler_factory: SchedulerFactory,
        metrics: MetricsRegistry,
        load_threads: int = 4,
        state_file: Path | None = None,
        drain_timeout: float = 30.0,
        parameter_keys: Sequence[Key[object]] = (),
        parameter_checks: Sequence[ModelCheck] = (),
        response_cache: ResponseCacheFactory | None = None,
    ) -> None:
        """``parameter_keys`` and ``parameter_checks``: what the composed components (the
        scheduler, drift monitoring) own of a model's parameters, beside the repository's own
        and each backend's. ``response_cache``: the server's (--cache-config), which gives
        each loaded version of a model with ``response_cache { enable: true }`` its share."""
        self.source = source
        self._backends = backends
        self._scheduler_factory = scheduler_factory
        self._parameter_keys = tuple(parameter_keys)
        self._parameter_checks = tuple(parameter_checks)
        self._metrics = metrics
        self._response_cache = response_cache
        self._models: dict[str, ModelRecord] = {}
        self._loader = ThreadPoolExecutor(max_workers=load_threads, thread_name_prefix="load")
        self._state_file = StateFile(state_file)
        self._state = self._state_file.load()
        self._state_writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="state")
        self._drain_timeout = drain_timeout
        #: Replaced versions draining before their unload, by the task retiring each.
        self._retiring: dict[asyncio.Task[None], ServedVersion] = {}
        self._source_fingerprints: dict[str, str] = {}
        self._catalog = EMPTY
        self._subscribers: list[CatalogSubscriber] = []

    # -- publishing ----------------------------------------------------------------------------

    @property
    def catalog(self) -> Catalog:
        """The latest snapshot."""
        return self._catalog

    def subscribe(self, subscriber: CatalogSubscriber) -> None:
        """Call ``subscriber`` with the current snapshot now and with every new one."""
        self._subscribers.append(subscriber)
        subscriber(self._catalog)

    def _publish(self) -> None:
        self._catalog = Catalog({name: r.view() for name, r in self._models.items()})
        for subscriber in self._subscribers:
            subscriber(self._catalog)

    def unloaded_names(self) -> list[str]:
        """Models the source offers that the manager has never loaded. Blocking (the source
        may be remote): call it from a worker thread."""
        try:
            offered = self.source.list()
        except ModelLoadError:
            return []
        known = set(self._catalog.models)
        return sorted(name for name in offered if name not in known)

    # -- write side --------------------------------------------------------------------------

    async def start(self, mode: ControlMode, load_models: tuple[str, ...] = ()) -> None:
        """Load what the control mode says to load at start (and what the state file says)."""
        if mode is ControlMode.EXPLICIT:
            wanted = set(load_models) | self._state.explicit_models
            if "*" in wanted:
                wanted = set(await asyncio.to_thread(self.source.list))
        else:
            wanted = set(await asyncio.to_thread(self.source.list))
        for name in sorted(wanted):
            try:
                check_model_name(name)
            except InvalidInput as exc:  # a hand-edited state file, a flag, a directory
                log.error("model name refused", extra={"model": name, "reason": exc.message})
                wanted.discard(name)
        await asyncio.gather(*(self._load_at_start(name) for name in sorted(wanted)))
        if mode is ControlMode.EXPLICIT:
            self._state.explicit_models = {n for n in wanted if n in self._models}
            self._save_state()
        self._publish()

    async def _load_at_start(self, name: str) -> None:
        self._source_fingerprints[name] = await asyncio.to_thread(self.source.fingerprint, name)
        if await self._resume_interrupted(name):
            return
        try:
            await self.load_model(name)
            return
        except (ModelLoadError, ModelNotFound):
            if self._catalog.is_ready(name, ""):
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
                self._publish()

    async def _resume_interrupted(self, name: str) -> bool:
        """The last run stopped while loading versions of ``name`` (the state file still says
        so): perhaps that load is what killed it. Serve the last good versions instead; the
        interrupted ones load again when the model's files change or on an explicit load.
        True when the last good versions serve."""
        interrupted = [str(v) for v in self._state.loading.get(name, [])]
        fallback = tuple(str(v) for v in self._state.last_good.get(name, []))
        if not interrupted or not fallback:
            return False
        log.warning("the last run stopped while loading these versions; serving the last "
                    "good versions instead", extra={"model": name,
                                                    "interrupted": ",".join(interrupted),
                                                    "versions": ",".join(fallback)})
        with contextlib.suppress(ModelLoadError, ModelNotFound):
            await self.load_model(name, versions=fallback)
        record = self._models.get(name)
        if record is None or not record.ready_order:
            return False
        for version in interrupted:
            if version not in fallback:
                record.versions.setdefault(version, VersionEntry(
                    version, ModelState.UNAVAILABLE,
                    "its load was interrupted: the server stopped while loading it; serving "
                    f"the last good versions {list(fallback)}; it loads again when the "
                    "model's files change or on an explicit load"))
        self._publish()
        return True

    async def load_model(
        self,
        name: str,
        config_override: mc.ModelConfig | None = None,
        versions: tuple[str, ...] | None = None,
        explicit: bool = False,
    ) -> None:
        """Load or reload one model without dropping requests. Raises ModelLoadError when no
        version of the model is ready afterwards (an older one may still be serving), and
        InvalidInput for a name that could be a path (before anything else happens).

        ``explicit``: an operator's load (explicit control mode); the state file then
        remembers whether the model serves, so a restart loads it again.
        """
        check_model_name(name)
        try:
            await self._load(name, config_override, versions)
        finally:
            if explicit:
                self._remember_explicit(name, self._catalog.is_ready(name, ""))

    async def _load(
        self, name: str, config_override: mc.ModelConfig | None,
        versions: tuple[str, ...] | None,
    ) -> None:
        try:
            model_dir = await asyncio.to_thread(self.source.fetch, name)
        except ModelLoadError as exc:
            # A remote source (MLflow) fails here: unreachable, unknown alias, no model file.
            # Record why, so RepositoryIndex shows it; a serving version keeps serving.
            failed = self._models.setdefault(
                name, ModelRecord(name=name, state=ModelState.UNAVAILABLE)
            )
            reason = self._load_failed(failed, "", str(exc))
            if not failed.ready_order:
                failed.state = ModelState.UNAVAILABLE
                failed.reason = reason
            self._publish()
            raise
        record = self._models.get(name)
        if record is None:
            record = self._models[name] = ModelRecord(name=name, state=ModelState.LOADING)
        async with record.lock:
            retired = await self._reconcile(record, model_dir, config_override, versions)
        for served in retired:
            self._retire_later(served)
        if record.state is not ModelState.READY:
            raise ModelLoadError(record.reason)
        if record.reason:
            raise ModelLoadError(f"{record.reason} (its serving versions are kept)")

    async def unload_model(self, name: str, forget: bool = False, explicit: bool = False) -> None:
        """Stop routing to every version of ``name``, let them finish, then unload them.

        ``forget``: the model left the repository. ``explicit``: an operator's unload, which
        the state file remembers.
        """
        check_model_name(name)
        record = self._models.get(name)
        if record is None:
            raise unknown_model(name)
        async with record.lock:
            retired = [e.served for e in record.versions.values() if e.served is not None]
            for entry in record.versions.values():
                entry.state = ModelState.UNLOADING
            record.ready_order = []
            record.state = ModelState.UNAVAILABLE
            record.reason = "unloaded"
            self._publish()
            await asyncio.gather(*(self._retire(s) for s in retired))
            for version in (*record.versions, ""):  # failed versions' series too
                self._metrics.forget(name, version)
            record.versions.clear()
            record.config_fingerprint = ""
            record.version_fingerprints.clear()
        if forget:
            self._models.pop(name, None)
            self._state.last_good.pop(name, None)
        self._publish()
        if explicit:
            self._state.explicit_models.discard(name)
        self._save_state()

    def _remember_explicit(self, name: str, loaded: bool) -> None:
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
        self, model_dir: Path, config_override: mc.ModelConfig | None,
        versions: tuple[str, ...] | None,
    ) -> LoadPlan:
        """Blocking: parse and validate the config, pick versions, auto-complete the spec."""
        config = config_override if config_override is not None \
            else config_io.read_config(model_dir)
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
        config_io.check_parameters(spec, (*self._parameter_keys, *factory.parameter_keys),
                                   self._parameter_checks)
        # Complete the spec from the newest version whose model file is there: a half-copied
        # version then fails on its own (and shows why) while the others load.
        complete = [
            v for v in sorted(set(chosen) | set(on_disk), key=lambda v: (v in chosen, v))
            if confined(model_dir / str(v), spec.default_model_filename,
                        f"model '{spec.name}' default_model_filename",
                        "the version directory").is_file()
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
        spec = with_labels(spec, model_dir)
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
            config_fingerprint=hashlib.sha256(str(config).encode()).hexdigest(),
            version_fingerprints=fingerprints,
            cards=cards,
        )

    async def _reconcile(
        self,
        record: ModelRecord,
        model_dir: Path,
        config_override: mc.ModelConfig | None,
        versions: tuple[str, ...] | None,
    ) -> list[ServedVersion]:
        """Bring one model in line with its plan; returns the versions to retire."""
        loop = asyncio.get_running_loop()
        try:
            plan = await loop.run_in_executor(
                self._loader, self._plan, model_dir, config_override, versions
            )
        except ModelLoadError as exc:
            reason = self._load_failed(record, "", str(exc), model_dir)
            if not record.ready_order:
                record.state = ModelState.UNAVAILABLE
            record.reason = reason
            self._publish()
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
        self._publish()
        if to_load:
            # On disk before the load begins: a load that kills the process is then not
            # retried at the next start (see _load_at_start).
            self._state.loading[record.name] = sorted(int(v) for v in to_load)
            await asyncio.wrap_future(self._save_state())
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
                reason = self._load_failed(record, version, str(result), model_dir)
                failures.append(f"version {version}: {reason}")
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
                    retired.append(entry.served)  # its series go once it is drained
                else:
                    self._metrics.forget(record.name, version)
            record.config = config_io.completed_config(plan.config, plan.spec)
            record.spec = plan.spec
            record.config_fingerprint = plan.config_fingerprint
            self._state.last_good[record.name] = sorted(
                int(v) for v in desired if record.versions[v].state is ModelState.READY
            )
        elif record.spec is None:
            record.spec = plan.spec
            record.config = config_io.completed_config(plan.config, plan.spec)
        if to_load:
            self._state.loading.pop(record.name, None)
        self._save_state()
        record.ready_order = sorted(
            (v for v, e in record.versions.items() if e.state is ModelState.READY),
            key=int, reverse=True,
        )
        record.state = ModelState.READY if record.ready_order else ModelState.UNAVAILABLE
        record.reason = "; ".join(failures)
        if not record.ready_order and not failures:
            record.reason = "no version could be loaded"
        self._publish()
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
        scheduler = self._scheduler_factory(plan.spec, version, instances, metrics)
        cache = None
        if plan.spec.response_cache:
            if self._response_cache is None:
                log.warning("the model enables response_cache but the server has no cache "
                            "(--cache-config): it serves uncached",
                            extra={"model": name, "version": version})
            else:
                cache = self._response_cache.for_version(plan.spec, version)
        metrics.stats.response_cache = cache is not None
        return ServedVersion(
            spec=plan.spec, version=version, scheduler=scheduler, metrics=metrics,
            description=instances[0].description, card=card, cache=cache,
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

    def _load_failed(self, record: ModelRecord, version: str, reason: str,
                     model_dir: Path | None = None) -> str:
        """Count and log a failed load (the whole reason); returns the reason to show clients
        (RepositoryIndex, the load's error), with paths relative to ``model_dir``."""
        self._metrics.load_failed(record.name, version)
        log.error("model failed to load",
                  extra={"model": record.name, "version": version, "reason": reason})
        return reason if model_dir is None else hide_paths(reason, [model_dir])

    # -- retiring ------------------------------------------------------------------------------

    def _retire_later(self, served: ServedVersion) -> None:
        task = asyncio.get_running_loop().create_task(self._retire(served))
        self._retiring[task] = served
        task.add_done_callback(self._retiring.pop)

    async def _retire(self, served: ServedVersion) -> None:
        """Drain a replaced version (it takes no new requests) and unload it."""
        name, version = served.spec.name, served.version
        if not self._catalog.is_ready(name, version):
            self._metrics.set_ready(name, version, False)
        finished = await served.scheduler.drain(self._drain_timeout)
        await served.scheduler.close()
        if served.cache is not None:
            served.cache.drop()
        if not self._holds(name, version):
            self._metrics.forget(name, version)
        log.info("model version unloaded", extra={
            "model": name, "version": version, "drained": finished,
        })

    def _holds(self, name: str, version: str) -> bool:
        """True while ``version`` serves or loads again (a reload of the same version shares
        its metrics, which must outlive the copy being retired)."""
        record = self._models.get(name)
        entry = record.versions.get(version) if record is not None else None
        return entry is not None and entry.state in (ModelState.LOADING, ModelState.READY)

    async def close(self, grace: float) -> None:
        """Drain every version, those being retired too, for ``grace`` seconds in all; then
        unload them: what is still queued or running is answered UNAVAILABLE, and no
        version waits for a batch stuck in its model. The state file is written last."""
        served = [*self._catalog.served_versions(), *self._retiring.values()]
        await asyncio.gather(*(s.scheduler.drain(grace) for s in served))
        await asyncio.gather(*(s.scheduler.close() for s in served))
        retiring = list(self._retiring)
        for task in retiring:
            task.cancel()  # closed above: nothing is left for the task to wait for
        await asyncio.gather(*retiring, return_exceptions=True)
        for record in self._models.values():
            for entry in record.versions.values():
                entry.served = None
                entry.state = ModelState.UNAVAILABLE
                entry.reason = "server shutting down"
            record.ready_order = []
        self._publish()
        self._loader.shutdown(wait=False)
        await asyncio.to_thread(self._state_writer.shutdown, True)

    def _save_state(self) -> concurrent.futures.Future[None]:
        """Persist a snapshot from the writer thread: fsync stays off the event loop, and one
        thread keeps the writes in order."""
        snapshot = RepositoryState(
            explicit_models=set(self._state.explicit_models),
            last_good={name: list(versions) for name, versions in self._state.last_good.items()},
            loading={name: list(versions) for name, versions in self._state.loading.items()},
        )
        return self._state_writer.submit(self._state_file.save, snapshot)


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
