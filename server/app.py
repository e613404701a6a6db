"""Composition root: settings -> objects -> wiring -> start / stop.

The only module that imports concrete backends and sidecars.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import ipaddress
import logging
import signal
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection
from prometheus_client import start_http_server

from server._pb import admin_pb2
from server._pb._pool import POOL
from server.admission import Admission, Bounds
from server.backends.onnxruntime import OnnxRuntimeFactory
from server.backends.python.factory import MlflowPyfuncFactory, PythonFactory
from server.backends.pytorch import PyTorchFactory
from server.backends.tensorrt import TensorRtFactory
from server.cache import ServerCache
from server.codec.caps import RequestCaps
from server.codec.validate import validate_request
from server.codec.wire import select_wire_codec
from server.control import ControlPlane
from server.dataplane import DataPlane
from server.drift import options as drift_config
from server.frontend.admin import AdminServicer
from server.frontend.guard import FilteredReflection, Guard
from server.frontend.handlers import add_service, method_handlers
from server.frontend.inference import InferenceServicer, ServerState, inference_handlers
from server.frontend.tracing import traced_handlers
from server.grpc_options import server_options
from server.interfaces import (
    Backend,
    BackendFactory,
    BatchTracer,
    DriftSink,
    ModelMetrics,
    ModelSource,
    Packer,
    Scheduler,
    SchedulerFactory,
    WatchableSource,
)
from server.logs import LogSettings
from server.metrics import MetricsRegistry
from server.metrics.admission import AdmissionMetrics
from server.metrics.cache import CacheMetrics
from server.metrics.drift import DriftCounts, DriftMetrics
from server.metrics.frontends import FrontendMetrics
from server.metrics.loop_lag import LoopLag
from server.metrics.routing import RoutingMetrics
from server.metrics.security import SecurityMetrics
from server.metrics.tracing import TracingMetrics
from server.multiproc.engine import HandlerTable
from server.multiproc.supervisor import Frontends
from server.packing import select_packer
from server.repository import model_config as config_io
from server.repository.manager import ControlMode, ModelManager
from server.repository.source import FilesystemSource
from server.rest.server import HttpServer, start_http
from server.routing.router import Router
from server.routing.shadow import ShadowMirror
from server.routing.store import RouteStore
from server.scheduler import batcher
from server.security import tls
from server.security.audit import AuditLog
from server.security.authenticator import Authenticator
from server.security.ratelimit import RateLimit, RateLimiter, parse_limit, parse_model_limits
from server.security.redact import redact_uri
from server.security.rules import parse_restrictions
from server.services import (
    ADMIN_DESCRIPTOR,
    ADMIN_SERVICE,
    HEALTH_DESCRIPTOR,
    INFERENCE_DESCRIPTOR,
    INFERENCE_SERVICE,
)
from server.settings import ServerSettings
from server.shm import RegistrationGate, SharedMemoryRegistry
from server.spec import ModelSpec
from server.tracing.codec import TracedCodec
from server.tracing.config import TraceConfig
from server.tracing.settings import TraceSettings
from server.tracing.trace import Tracer
from server.types import Array, InferRequest, InferResponse

if TYPE_CHECKING:
    from server.drift.analyser import DriftAnalyser
    from server.drift.retrain import RetrainHook, Run
    from server.tracing.exporter import SpanExporter

log = logging.getLogger(__name__)



def backend_factories() -> dict[str, BackendFactory]:
    """Every backend by its config name. TensorRT and PyTorch register even where their
    libraries are missing: they import tensorrt and cuda-python, or torch, only when one of
    their models loads, and fail that load clearly. Python and MLflow pyfunc models run in
    model processes (mlflow imported there only)."""
    return {"onnxruntime": OnnxRuntimeFactory(), "tensorrt": TensorRtFactory(),
            "pytorch": PyTorchFactory(), "python": PythonFactory(),
            "mlflow_pyfunc": MlflowPyfuncFactory()}


#: The model parameters the components composed here own (beside the repository's own and
#: each backend's), and drift's rule over several of them.
PARAMETER_KEYS = (*batcher.PARAMETER_KEYS, *drift_config.PARAMETER_KEYS)
PARAMETER_CHECKS = (drift_config.parse,)


def check_model_parameters(spec: ModelSpec, factory: BackendFactory) -> None:
    """What the repository checks at load, for tools that open a model without a server."""
    config_io.check_parameters(spec, (*PARAMETER_KEYS, *factory.parameter_keys),
                               PARAMETER_CHECKS)


def batcher_factory(packer: Packer, execution_timeout_s: float,
                    max_queue_wait_s: float = 0.0,
                    tracer: BatchTracer | None = None) -> SchedulerFactory:
    """Every loaded version gets a dynamic batcher over the chosen packing, with the server's
    default execution timeout and queue-wait bound (and the tracer, when tracing is on)."""

    def make(spec: ModelSpec, version: str, instances: Sequence[Backend],
             metrics: ModelMetrics) -> Scheduler:
        return batcher.DynamicBatcher(spec, version, instances, packer, metrics,
                                      execution_timeout_s=execution_timeout_s,
                                      max_queue_wait_s=max_queue_wait_s, tracer=tracer)

    return make


def model_source(settings: ServerSettings) -> ModelSource:
    """The filesystem (--model-repository) by default; the MLflow Model Registry for an
    mlflow:// --model-source (imported only then: mlflow is an optional extra)."""
    if settings.mlflow_tracking_uri is not None:
        from server.repository.mlflow_source import MlflowSource

        return MlflowSource(settings.mlflow_tracking_uri, settings.mlflow_models,
                            settings.model_cache_dir)
    return FilesystemSource(settings.model_repository)


def open_audit(settings: ServerSettings) -> AuditLog | None:
    return AuditLog(settings.audit_log, settings.audit_log_max_bytes,
                    settings.audit_log_backups) if settings.audit_log else None


def build_guard(settings: ServerSettings, metrics: MetricsRegistry,
                audit: AuditLog | None) -> Guard | None:
    """The authorization guard the security options ask for; None when none is set (then no
    handler is wrapped and nothing is checked per request). It closes ``audit`` at stop."""
    restrictions = parse_restrictions(settings.grpc_restricted_protocol)
    default_limit = parse_limit(settings.rate_limit) if settings.rate_limit else None
    model_limits = parse_model_limits(settings.model_rate_limit)
    authenticator = Authenticator(settings.auth_file) if settings.auth_file else None
    if not (restrictions or default_limit or model_limits or authenticator or audit):
        return None
    counters = SecurityMetrics(metrics.registry)
    limiter = None
    if default_limit or model_limits or authenticator is not None:

        def identity_limit(name: str) -> RateLimit | None:
            own = authenticator.limit_of(name) if authenticator is not None else None
            return own or default_limit

        limiter = RateLimiter(identity_limit, model_limits, counters.rate_limited)
    return Guard(authenticator, restrictions, limiter, audit, counters.refused)


def build_admission(settings: ServerSettings, metrics: MetricsRegistry) -> Admission:
    """The server-wide bounds, their gauges (read at scrape time) and refusal counter."""
    admission: Admission  # the gauges read it at scrape time, once it exists
    counters = AdmissionMetrics(metrics.registry, lambda: admission.inflight,
                                lambda: admission.streams, lambda: admission.queued_bytes)
    admission = Admission(Bounds(settings.max_inflight_requests,
                                 settings.max_inflight_per_stream, settings.max_streams,
                                 settings.queued_bytes_bound), counters.refused)
    return admission


def build_cache(settings: ServerSettings, metrics: MetricsRegistry) -> ServerCache | None:
    """The response cache --cache-config asks for, and its gauges; None without the flag."""
    if not settings.response_cache_bytes:
        return None
    cache = ServerCache(settings.response_cache_bytes)
    CacheMetrics(metrics.registry, cache.store)
    return cache


def build_tracing(config: TraceConfig | None, settings: TraceSettings,
                  metrics: MetricsRegistry) -> tuple[Tracer | None, SpanExporter | None]:
    """The tracer and its exporter --trace-config asks for, and the exporter's counters;
    (None, None) without the flag: then no handler, codec or batcher is wrapped and nothing
    is done per request."""
    if config is None:
        return None, None
    from server.tracing.exporter import SpanExporter  # the tracing extra: imported only now

    exporter = SpanExporter(config)
    TracingMetrics(metrics.registry, lambda: (exporter.exported_spans, exporter.dropped_spans,
                                              exporter.failed_spans))
    return Tracer(settings, exporter.offer), exporter


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class PeregrineServer:
    """One server: the repository, the dataplane, the gRPC server and the metrics endpoint."""

    def __init__(self, settings: ServerSettings) -> None:
        self.settings = settings
        self.metrics = MetricsRegistry()
        self.loop_lag = LoopLag(self.metrics.registry)
        #: Compiled packing unless PEREGRINE_NATIVE=0 (read now, at start: not at import).
        self.packer = select_packer()
        #: What TraceSetting reads and changes; the tracer and its exporter only with
        #: --trace-config.
        self.trace_settings = TraceSettings(settings.tracing)
        self.tracer, self.trace_exporter = build_tracing(settings.tracing, self.trace_settings,
                                                         self.metrics)
        #: The native wire codec unless PEREGRINE_NATIVE=0 (likewise read at start), checking
        #: the request caps before decoding; with tracing, wrapped to sample and time requests.
        codec = select_wire_codec(caps=RequestCaps(
            settings.tensor_elements_cap, settings.request_bytes_cap,
            settings.bytes_elements_cap))
        self.codec = codec if self.tracer is None else TracedCodec(codec, self.tracer)
        self.admission = build_admission(settings, self.metrics)
        #: The response cache (--cache-config); None without the flag.
        self.cache = build_cache(settings, self.metrics)
        #: The codec the servicer parses with before looking a request up in the cache: only
        #: with a cache, and untraced (a traced request is sampled as it is decoded).
        self._cache_codec = codec if self.cache is not None and self.tracer is None else None
        self.repository = ModelManager(
            model_source(settings),
            backend_factories(),
            batcher_factory(self.packer, settings.execution_timeout_secs,
                            settings.max_queue_wait_ms / 1000, self.tracer),
            self.metrics,
            load_threads=settings.model_load_thread_count,
            state_file=settings.resolved_state_file,
            drain_timeout=settings.exit_timeout_secs,
            parameter_keys=PARAMETER_KEYS,
            parameter_checks=PARAMETER_CHECKS,
            response_cache=self.cache,
        )
        self.mode = ControlMode(settings.model_control_mode)
        routing_metrics = RoutingMetrics(self.metrics.registry)
        self.mirror = ShadowMirror(routing_metrics)
        self.router = Router(
            lambda name, version: self.repository.catalog.spec_of(name, version),
            routing_metrics,
            self.mirror,
            # Beside the model's local files; not source.fetch, which for MLflow means a
            # registry round trip (and raises for a model that failed to fetch).
            RouteStore(lambda model: settings.models_root / model),
        )
        self._poller: asyncio.Task[None] | None = None
        self.state = ServerState(strict_readiness=settings.strict_readiness)
        self.health = HealthServicer()
        self.grpc_port = 0
        #: The HTTP/REST port (--allow-http), else 0.
        self.http_port = 0
        self.metrics_port = 0
        self._grpc: grpc.aio.Server | None = None
        #: Every service's method handlers, once started (a gRPC call's path -> handler).
        self.handlers = HandlerTable()
        #: The REST server of a single process (with frontends, theirs).
        self._http: HttpServer | None = None
        #: The frontend processes, with --frontends above 1 (then there is no _grpc).
        self._frontends: Frontends | None = None
        self._metrics_http: Any = None
        self.drift: DriftAnalyser | None = None
        self.retrain: RetrainHook | None = None
        #: Client-registered system shared-memory regions; closed at stop.
        self.shared_memory = SharedMemoryRegistry(settings.shm_max_regions,
                                                  settings.shm_max_mapped_bytes)
        #: Control actions, refusals and retrain hook runs (--audit-log); None without it.
        self.audit = open_audit(settings)
        self.guard = build_guard(settings, self.metrics, self.audit)
        self._auth_watcher: asyncio.Task[None] | None = None
        #: What LogSettings reads and changes; the logging is put back at stop.
        self.log_settings = LogSettings(settings.log_level, settings.log_format)

    async def start(self) -> None:
        settings = self.settings
        credentials = tls.server_credentials(settings)  # a bad file fails before models load
        await self.repository.start(self.mode, settings.load_model)
        self.router.load_persisted(self.repository.catalog.names())
        drift = await self._start_drift()
        self.dataplane = dataplane = DataPlane(self.repository.catalog, self.router, drift)
        self.repository.subscribe(dataplane.use_catalog)
        self.mirror.connect(dataplane.submit)
        self.control = control = ControlPlane(
            self.repository, self.router, self.mode,
            self.drift.reports if self.drift is not None else None, self.trace_settings)
        # The services are registered on one table: a single process's gRPC server serves
        # them, and so do the engine's links to its frontend processes (server/multiproc) and
        # the REST gateway, which calls the same handlers (server/rest).
        server = self.handlers
        guard = self.guard
        servicer = InferenceServicer(
            control, dataplane, self.state, self.codec,
            header_pattern=settings.grpc_header_forward_pattern,
            shared_memory=self.shared_memory,
            admit=guard.admit_inference if guard is not None and guard.checks_requests
            else None,
            shm_gate=RegistrationGate(settings.allow_client_shm,
                                      settings.shm_remote_registration),
            admission=self.admission,
            logging_settings=self.log_settings,
            cache_codec=self._cache_codec,
        )
        inference = inference_handlers(servicer)
        admin = method_handlers(AdminServicer(control), ADMIN_DESCRIPTOR, admin_pb2)
        if guard is not None:
            inference = guard.wrap(INFERENCE_SERVICE, inference)
            admin = guard.wrap(ADMIN_SERVICE, admin)
        if self.tracer is not None:
            # Outermost: a unary request's span covers the guard's checks, and a call the
            # guard refuses is traced with its status.
            inference = traced_handlers(inference, self.tracer)
        add_service(server, INFERENCE_DESCRIPTOR, inference)
        add_service(server, ADMIN_DESCRIPTOR, admin)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        if settings.reflection:
            services = (INFERENCE_SERVICE, ADMIN_SERVICE, HEALTH_DESCRIPTOR.full_name,
                        reflection.SERVICE_NAME)
            if guard is not None and settings.auth_file is not None:
                FilteredReflection(guard, services, _merged_pool()).add_to(server)
            else:
                reflection.enable_server_reflection(services, server, pool=_merged_pool())
        if settings.frontends > 1:
            frontends = self._frontends = Frontends(settings.frontends, settings, server)
            FrontendMetrics(self.metrics.registry, lambda: frontends.stats,
                            lambda: frontends.restarts)
            self.grpc_port = await frontends.start()
            self.http_port = frontends.http_port
        else:
            grpc_server = grpc.aio.server(options=server_options(settings, reuse_port=False))
            server.register_on(grpc_server)
            address = _address(settings.host, settings.grpc_port)
            try:
                self.grpc_port = (grpc_server.add_insecure_port(address) if credentials is None
                                  else grpc_server.add_secure_port(address, credentials))
            except RuntimeError as exc:
                raise OSError(f"cannot bind gRPC to {address}: {exc}") from exc
            await grpc_server.start()
            self._grpc = grpc_server
            if settings.allow_http:
                self._http, self.http_port = await start_http(settings, server.call,
                                                              reuse_port=False)
        if settings.allow_metrics:
            httpd, _thread = start_http_server(
                settings.metrics_port, addr=settings.metrics_address,
                registry=self.metrics.registry
            )
            self._metrics_http = httpd
            self.metrics_port = int(httpd.server_address[1])
        self._start_tracing()
        self.state.accepting = True
        self.loop_lag.start(asyncio.get_running_loop())
        if guard is not None and settings.auth_file is not None:
            self._auth_watcher = asyncio.get_running_loop().create_task(
                guard.watch_auth_file(), name="auth-file-watch")
        elif not _loopback(settings.host):
            log.warning("no --auth-file: any client that can reach the port may call every "
                        "RPC, model control included (see docs/security.md)",
                        extra={"host": settings.host})
        if self.mode is ControlMode.POLL:
            self._poller = asyncio.get_running_loop().create_task(
                self._poll_forever(settings.repository_poll_secs), name="repo-poll"
            )
        status = health_pb2.HealthCheckResponse.SERVING
        await self.health.set("", status)
        await self.health.set(INFERENCE_SERVICE, status)
        ready = self.repository.catalog.index(ready_only=True)
        log.info("server started", extra={
            "grpc": f"{settings.host}:{self.grpc_port}",
            "http": f"{settings.http_host}:{self.http_port}" if settings.allow_http else "off",
            "tls": "mutual" if settings.grpc_use_ssl_mutual else
            "on" if settings.grpc_use_ssl else "off",
            "metrics": f"{settings.metrics_address}:{self.metrics_port}"
            if settings.allow_metrics else "off",
            "repository": redact_uri(settings.model_source) or str(settings.model_repository),
            "ready_versions": len(ready),
        })

    def _start_tracing(self) -> None:
        config = self.settings.tracing
        if self.trace_exporter is None or config is None:
            return
        self.trace_exporter.start()
        log.info("tracing", extra={
            "endpoint": str(config.endpoint), "level": "TIMESTAMPS" if config.timestamps
            else "OFF", "rate": config.rate, "count": config.count})
        if not config.timestamps:
            log.warning("tracing is configured with level OFF (Triton's default): no request "
                        "is traced until --trace-config level=TIMESTAMPS, or TraceSetting "
                        "sets trace_level TIMESTAMPS")

    @property
    def frontends(self) -> Frontends | None:
        """The frontend processes (--frontends above 1), else None."""
        return self._frontends

    async def _poll_forever(self, interval: float) -> None:
        """Poll mode: apply repository changes, then routing files that changed.

        A source with change events (the filesystem, through inotify and friends) wakes the
        scan at once; the periodic rescan stays as the fallback for missed events.
        """
        changed = asyncio.Event()
        watcher = None
        if isinstance(self.repository.source, WatchableSource):
            watcher = asyncio.get_running_loop().create_task(
                _forward_changes(self.repository.source, changed), name="repo-watch"
            )
        try:
            while True:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(changed.wait(), interval)
                changed.clear()
                await self._poll_once()
        finally:
            if watcher is not None:
                watcher.cancel()
                await asyncio.gather(watcher, return_exceptions=True)

    async def _poll_once(self) -> None:
        try:
            await self.repository.poll_once()
            self.router.load_persisted(self.repository.catalog.names())
        except Exception as exc:  # the poller must survive a bad scan
            log.error("repository poll failed", extra={"error": repr(exc)}, exc_info=exc)

    async def stop(self, grace: float | None = None) -> None:
        """Stop taking requests (new ones are answered UNAVAILABLE) and answer the accepted
        ones within ``grace`` seconds in all: the models drain until the deadline, then what
        is still queued or running is answered UNAVAILABLE (never waiting for a batch stuck
        in a model), and the transport closes the calls left (open streams) at the same
        deadline. Then the state file and the drift store are flushed."""
        grace = self.settings.exit_timeout_secs if grace is None else grace
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace

        def left() -> float:
            return max(0.0, deadline - loop.time())

        log.info("server stopping", extra={"grace_secs": grace})
        self.state.accepting = False
        self.loop_lag.stop()
        for task in (self._poller, self._auth_watcher):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        await self.health.enter_graceful_shutdown()
        await self.router.close()
        await self.repository.close(left())
        # The transport stops once the models are drained: until then a new call is answered
        # UNAVAILABLE by the servicers, not cancelled by gRPC's core (with frontends, they
        # keep forwarding calls to the engine until then, likewise). The metrics endpoint
        # stops beside it: its shutdown polls every 0.5 s.
        await asyncio.gather(
            self._grpc.stop(left()) if self._grpc is not None else asyncio.sleep(0),
            self._frontends.stop(left()) if self._frontends is not None
            else asyncio.sleep(0),
            self._http.stop(left()) if self._http is not None else asyncio.sleep(0),
            asyncio.to_thread(self._stop_metrics_http))
        if self.trace_exporter is not None:
            await asyncio.to_thread(self.trace_exporter.close, left())
        if self.drift is not None:
            await loop.run_in_executor(None, self.drift.stop)
        if self.retrain is not None:
            await loop.run_in_executor(None, self.retrain.close)
        self.shared_memory.close()
        self.log_settings.close()
        if self.guard is not None:
            self.guard.close()
        self.state.live = False
        log.info("server stopped")

    def _stop_metrics_http(self) -> None:
        if self._metrics_http is not None:
            self._metrics_http.shutdown()
            self._metrics_http.server_close()

    async def _start_drift(self) -> DriftSink | None:
        """Drift monitoring runs when a model loaded at start asks for it (drift_sample_rate >
        0 in its config); versions loaded later are picked up on their first request."""
        served = self.repository.catalog.served_versions()
        if not any(_wants_drift(s.spec) for s in served):
            if self.settings.retrain.enabled:
                log.warning("the retrain hook never runs: no model loaded at start monitors "
                            "drift (drift_sample_rate above 0 in its config)")
            return None
        try:
            from server.drift.analyser import DriftAnalyser
            from server.drift.sampler import DriftSampler
        except ImportError as exc:
            log.error("drift monitoring needs its extra: pip install 'peregrine[drift]'",
                      extra={"error": repr(exc)})
            return None
        sampler = DriftSampler()
        for version in served:
            sampler.register(version.spec, version.version)
        # Versions unloaded or retired lose their sampler, and then their gauges.
        self.repository.subscribe(lambda catalog: sampler.retain(frozenset(
            (s.spec.name, s.version) for s in catalog.served_versions())))
        gauges = DriftMetrics(self.metrics.registry)
        self.retrain = self._retrain_hook(gauges)
        analyser = DriftAnalyser(sampler, self.settings.models_root, gauges,
                                 retrain=self.retrain)
        gauges.count_from(lambda: [
            DriftCounts(s.model, s.version, s.ring.pushed, s.ring.dropped, s.unprofiled)
            for s in sampler.samplers()
        ], analyser)
        # Load the reference profiles before traffic arrives, off the loop.
        await asyncio.get_running_loop().run_in_executor(None, analyser.run_once)
        analyser.start()
        self.drift = analyser
        return sampler

    def _retrain_hook(self, gauges: DriftMetrics) -> RetrainHook | None:
        """The continuous-training hook (--retrain-command / --retrain-url), if configured:
        each run counted, and audited when there is an audit log."""
        settings = self.settings.retrain
        if not settings.enabled:
            return None
        from server.drift.retrain import RetrainHook

        audit = self.audit

        def record(run: Run) -> None:
            gauges.retrain_run(run.model, run.version, run.outcome)
            if audit is not None:
                audit.record(identity="peregrine", source="server", peer="",
                             rpc="RetrainHook", target=run.model,
                             outcome="OK" if run.outcome == "ok" else run.outcome.upper(),
                             detail=f"version {run.version}, {run.reason}: {run.detail}")

        return RetrainHook(settings, self.settings.models_root, record)


def _wants_drift(spec: ModelSpec) -> bool:
    return drift_config.parse(spec.parameters, spec.name).enabled


def open_model_offline(repository: Path, model: str) -> tuple[ModelSpec, Callable[[str], Backend]]:
    """For offline tools (``peregrine drift profile``): a model's completed spec and a loader
    of one instance of one of its versions, without a server."""
    model_dir = repository / model
    spec = config_io.to_spec(config_io.read_config(model_dir), model_dir)
    factory = backend_factories().get(spec.backend)
    if factory is None:
        raise ValueError(f"model '{model}': backend '{spec.backend}' is not available")
    check_model_parameters(spec, factory)
    versions = sorted((p for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit()),
                      key=lambda p: int(p.name))
    if not versions:
        raise ValueError(f"model '{model}' has no numeric version directory")
    spec = factory.complete_spec(spec, str(versions[-1]))

    def load(version: str) -> Backend:
        return factory.load(spec, str(model_dir / version), 0)

    return spec, load


class OfflineModel:
    """One model served by the server's own pieces (repository manager, backends,
    preprocessing, dynamic batcher, data plane) without a transport: ``peregrine batch``
    submits its InferRequests here as the gRPC servicer does."""

    def __init__(self, manager: ModelManager, dataplane: DataPlane, spec: ModelSpec,
                 version: str) -> None:
        self._manager = manager
        self._dataplane = dataplane
        self.spec = spec
        self.version = version

    def submit(self, request: InferRequest) -> asyncio.Future[InferResponse]:
        return self._dataplane.submit(request)

    @property
    def runs_direct(self) -> bool:
        """Whether ``score_chunks`` may be used: the version is served by a dynamic batcher
        (not a sequence batcher or an ensemble) with one instance whose backend takes packed
        batches (not a Python model's process)."""
        scheduler = self._manager.catalog.get(self.spec.name, self.version).scheduler
        return (isinstance(scheduler, batcher.DynamicBatcher) and len(scheduler.instances) == 1
                and scheduler.executor.takes_rows)

    async def score_chunks(self, inputs: Mapping[str, Array], spans: Sequence[tuple[int, int]],
                           batch_size: int, deliver: Callable[[dict[str, Array]], None]) -> None:
        """Each span [first, last) of the rows of ``inputs`` (arrays of one datatype and shape
        per row, rows first) in batches of ``batch_size``, skipping the queue
        (DynamicBatcher.run_rows); ``deliver`` gets each span's declared outputs (one array
        of its rows each) on the instance's thread. The first batch is validated as the data
        plane validates a request: every other batch is a row slice of the same arrays, so it
        differs only in its row count."""
        spec = self.spec
        scheduler = self._manager.catalog.get(spec.name, self.version).scheduler
        assert isinstance(scheduler, batcher.DynamicBatcher)
        if not spans:
            return
        start = spans[0][0]
        first = {name: value[start:start + batch_size] if spec.batches else value[start]
                 for name, value in inputs.items()}
        types = {t.name: t.datatype for t in spec.client_inputs}
        validate_request(InferRequest(spec.name, self.version, str(start), first,
                                      {name: types[name] for name in first if name in types}),
                         spec)
        await scheduler.run_rows(inputs, spans, batch_size, deliver)

    async def close(self) -> None:
        await self._manager.close(30.0)


async def open_offline(repository: Path, model: str, version: str = "") -> OfflineModel:
    """Load ``model`` (``version``, else what its version policy serves, the highest then
    chosen) from a filesystem repository as ``peregrine serve`` would, explicit control mode,
    no state file. Raises ModelLoadError or ModelNotFound as a server load does."""
    manager = ModelManager(
        FilesystemSource(repository), backend_factories(),
        batcher_factory(select_packer(), ServerSettings().execution_timeout_secs),
        MetricsRegistry(), load_threads=1, parameter_keys=PARAMETER_KEYS,
        parameter_checks=PARAMETER_CHECKS)
    await manager.start(ControlMode.EXPLICIT)
    try:
        await manager.load_model(model, versions=(version,) if version else None)
        served = manager.catalog.get(model, version)
    except BaseException:
        await manager.close(0.0)
        raise
    dataplane = DataPlane(manager.catalog)
    manager.subscribe(dataplane.use_catalog)
    return OfflineModel(manager, dataplane, served.spec, served.version)


def _merged_pool() -> descriptor_pool.DescriptorPool:
    """Reflection answers from one pool: ours plus the health service's descriptors."""
    merged = descriptor_pool.DescriptorPool()
    for proto in (POOL.FindFileByName("model_config.proto"),
                  POOL.FindFileByName("grpc_service.proto"),
                  POOL.FindFileByName("admin.proto"),
                  health_pb2.DESCRIPTOR):
        file_proto = descriptor_pb2.FileDescriptorProto()
        proto.CopyToProto(file_proto)
        merged.Add(file_proto)
    return merged


async def _forward_changes(source: WatchableSource, changed: asyncio.Event) -> None:
    try:
        async for _ in source.watch():
            changed.set()
    except Exception as exc:  # events are an optimisation: polling carries on without them
        log.warning("repository change events unavailable; polling only",
                    extra={"error": repr(exc)})


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def serve(settings: ServerSettings) -> None:
    """Run until SIGINT or SIGTERM, then stop gracefully."""
    server = PeregrineServer(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await server.start()
    # Everything built so far (modules, models, protobuf descriptors) lives as long as the
    # process: out of the collector's sight, a full collection no longer walks it, which took
    # pauses of a hundred milliseconds and more under load.
    gc.freeze()
    await stop.wait()
    await server.stop()
