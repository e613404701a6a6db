"""Server settings: parsed and validated once at start, then frozen.

Precedence, lowest first: defaults, a TOML file (``--config-file`` or PEREGRINE_CONFIG_FILE),
environment variables (PEREGRINE_<OPTION>), command-line flags. Every option is declared once
in OPTIONS; the flags, the variables and the TOML keys are derived from it.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from server.drift.retrain_options import RetrainSettings
from server.tracing.config import TraceConfig, check_extra, parse_trace_config

ENV_PREFIX = "PEREGRINE_"
MIB = 1024 * 1024
#: Bytes of message a BYTES element takes at the least (a 4-byte length prefix and a little
#: payload) against what it costs decoded (a Python bytes object and its pointer, about 64
#: bytes): the default --max-bytes-elements is the message limit over this.
BYTES_ELEMENT_COST = 64
#: The default --max-queued-bytes holds this many requests of the largest size.
QUEUED_REQUESTS = 16


def default_repository() -> Path:
    """examples/models in the working directory, else the one beside the source checkout."""
    local = Path("examples/models")
    if local.is_dir():
        return local
    beside_source = Path(__file__).resolve().parent.parent / "examples" / "models"
    return beside_source if beside_source.is_dir() else local


def parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected true or false, got '{text}'")


def default_model_cache() -> Path:
    """Where a remote model source (MLflow) materialises models: the user's cache directory."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "peregrine" / "models"


#: ``--model-source`` prefixes of an MLflow tracking server -> the scheme of its HTTP API.
MLFLOW_SCHEMES = {"mlflow://": "http://", "mlflow+http://": "http://",
                  "mlflow+https://": "https://"}


def parse_cache_config(text: str) -> int:
    """Triton's ``--cache-config`` value, ``local,size=<bytes>``: the local cache's size."""
    kind, _, rest = text.partition(",")
    if kind.strip() != "local":
        raise ValueError(f"only the local cache is offered (local,size=<bytes>), got '{text}'")
    values: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in rest.split(","))):
        key, equals, value = item.partition("=")
        if not equals or key.strip() != "size":
            raise ValueError(f"the local cache takes size=<bytes> only, got '{item}'")
        values["size"] = value.strip()
    if "size" not in values:
        raise ValueError(f"the local cache needs size=<bytes>, got '{text}'")
    try:
        size = int(values["size"])
    except ValueError:
        raise ValueError(f"cache size must be a number of bytes, got '{values['size']}'") from None
    if size <= 0:
        raise ValueError(f"cache size must be positive, got {size}")
    return size


def checked_cache_config(text: str) -> str:
    """The --cache-config value, once it parses (the settings keep the text)."""
    parse_cache_config(text)
    return text


def parse_names(text: str) -> tuple[str, ...]:
    return tuple(name.strip() for name in text.split(",") if name.strip())


def parse_frontends(text: str) -> int:
    """A count, or ``auto``: a frontend per core but one, kept for the engine."""
    if text.strip().lower() == "auto":
        return max(1, (os.cpu_count() or 1) - 1)
    return int(text)


def parse_specs(text: str) -> tuple[str, ...]:
    """Semicolon-separated items (a repeatable flag's values are joined with ';')."""
    return tuple(item.strip() for item in text.split(";") if item.strip())


@dataclass(frozen=True, slots=True)
class Option:
    name: str
    kind: Callable[[str], Any]
    help: str
    choices: tuple[str, ...] = ()
    #: The flag may be given several times; its values are joined with ';' (parse_specs).
    repeatable: bool = False

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.upper()


@dataclass(frozen=True, slots=True)
class ServerSettings:
    model_repository: Path = dataclasses.field(default_factory=default_repository)
    host: str = "127.0.0.1"
    grpc_port: int = 8001
    #: HTTP/REST (the Open Inference Protocol's REST surface); off unless asked for.
    allow_http: bool = False
    http_port: int = 8000
    #: Empty: --host.
    http_address: str = ""
    http_max_connections: int = 1024
    metrics_port: int = 8002
    allow_metrics: bool = True
    log_level: str = "info"
    log_format: str = "text"
    grpc_max_message_bytes: int = 64 * MIB
    model_load_thread_count: int = 4
    exit_timeout_secs: float = 30.0
    execution_timeout_secs: float = 30.0
    strict_readiness: bool = True
    uvloop: bool = True
    reflection: bool = True
    model_control_mode: str = "none"
    repository_poll_secs: float = 15.0
    load_model: tuple[str, ...] = ()
    state_file: Path | None = None
    grpc_header_forward_pattern: str = ""
    model_source: str = ""
    mlflow_models: tuple[str, ...] = ()
    model_cache_dir: Path = dataclasses.field(default_factory=default_model_cache)
    #: Triton's ``local,size=<bytes>``; empty: no response cache.
    cache_config: str = ""
    #: Triton's ``--trace-config`` entries (server/tracing/config.py); empty: no tracing.
    trace_config: tuple[str, ...] = ()
    # -- security (docs/security.md) --
    grpc_use_ssl: bool = False
    grpc_server_cert: Path | None = None
    grpc_server_key: Path | None = None
    grpc_root_cert: Path | None = None
    grpc_use_ssl_mutual: bool = False
    metrics_address: str = "127.0.0.1"
    auth_file: Path | None = None
    grpc_restricted_protocol: tuple[str, ...] = ()
    rate_limit: str = ""
    model_rate_limit: tuple[str, ...] = ()
    audit_log: Path | None = None
    audit_log_max_bytes: int = 64 * MIB
    audit_log_backups: int = 5
    # -- the continuous-training hook (server/drift/retrain.py) --
    retrain_command: str = ""
    retrain_url: str = ""
    retrain_cooldown_secs: float = 3600.0
    retrain_timeout_secs: float = 300.0
    retrain_every_rows: int = 0
    retrain_every_secs: float = 0.0
    allow_client_shm: bool = False
    shm_remote_registration: bool = False
    shm_max_regions: int = 64
    shm_max_mapped_bytes: int = 4096 * MIB
    # -- bounds (docs/configuration.md, "Bounds"); None: derived, see the *_cap properties --
    max_inflight_requests: int = 4096
    grpc_max_pending_calls: int = 256
    #: gRPC frontend processes; 1: one process serves everything (see server/multiproc).
    frontends: int = 1
    #: Bytes of each frontend's request arena (server/multiproc/arena.py); 0: none.
    frontend_arena_bytes: int | None = None
    max_queue_wait_ms: float = 0.0
    max_inflight_per_stream: int = 128
    max_streams: int = 1024
    max_queued_bytes: int | None = None
    max_tensor_elements: int | None = None
    max_request_bytes: int | None = None
    max_bytes_elements: int | None = None

    def __post_init__(self) -> None:
        for port_name in ("grpc_port", "metrics_port", "http_port"):
            port = getattr(self, port_name)
            if not 0 <= port <= 65535:
                raise ValueError(f"{port_name} must be within 0..65535, got {port}")
        if self.grpc_max_message_bytes <= 0:
            raise ValueError("grpc_max_message_bytes must be positive")
        if self.model_load_thread_count <= 0:
            raise ValueError("model_load_thread_count must be positive")
        if self.exit_timeout_secs < 0:
            raise ValueError("exit_timeout_secs must not be negative")
        if self.execution_timeout_secs < 0:
            raise ValueError("execution_timeout_secs must not be negative")
        if self.max_queue_wait_ms < 0:
            raise ValueError("max_queue_wait_ms must not be negative")
        if self.repository_poll_secs <= 0:
            raise ValueError("repository_poll_secs must be positive")
        if self.grpc_header_forward_pattern:
            try:
                re.compile(self.grpc_header_forward_pattern)
            except re.error as exc:
                raise ValueError(f"grpc_header_forward_pattern: {exc}") from None
        if self.load_model and self.model_control_mode != "explicit":
            raise ValueError("load_model needs model_control_mode explicit")
        if self.model_source and self.mlflow_tracking_uri is None:
            raise ValueError(f"model_source must be empty (the filesystem) or start with one of "
                             f"{', '.join(MLFLOW_SCHEMES)}, got '{self.model_source}'")
        if self.mlflow_tracking_uri is not None and not self.mlflow_models:
            raise ValueError("an MLflow model_source needs mlflow_models (e.g. digits@champion)")
        if self.mlflow_models and self.mlflow_tracking_uri is None:
            raise ValueError("mlflow_models needs an MLflow model_source (mlflow://HOST:PORT)")
        if self.cache_config:
            try:
                parse_cache_config(self.cache_config)
            except ValueError as exc:
                raise ValueError(f"cache_config: {exc}") from None
        if self.trace_config:
            try:
                parse_trace_config(self.trace_config)
                check_extra()
            except ValueError as exc:
                raise ValueError(f"trace_config: {exc}") from None
        self._check_security()
        self._check_bounds()
        self.retrain.check()

    @property
    def retrain(self) -> RetrainSettings:
        return RetrainSettings(self.retrain_command, self.retrain_url,
                               self.retrain_cooldown_secs, self.retrain_timeout_secs,
                               self.retrain_every_rows, self.retrain_every_secs)

    def _check_bounds(self) -> None:
        for name in ("max_inflight_requests", "grpc_max_pending_calls", "frontends",
                     "http_max_connections",
                     "max_inflight_per_stream", "max_streams",
                     "max_queued_bytes", "max_tensor_elements", "max_request_bytes",
                     "max_bytes_elements"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be positive")
        if self.frontend_arena_bytes is not None and self.frontend_arena_bytes < 0:
            raise ValueError("frontend_arena_bytes must not be negative")
        if self.queued_bytes_bound < self.request_bytes_cap:
            raise ValueError(f"max_queued_bytes ({self.queued_bytes_bound}) must be at least "
                             f"max_request_bytes ({self.request_bytes_cap}): a request that "
                             "large could never be accepted")

    @property
    def http_host(self) -> str:
        """The address HTTP binds: --http-address, else --host."""
        return self.http_address or self.host

    @property
    def response_cache_bytes(self) -> int:
        """The response cache's size from --cache-config; 0 without one."""
        return parse_cache_config(self.cache_config) if self.cache_config else 0

    @property
    def tracing(self) -> TraceConfig | None:
        """The parsed --trace-config; None without the flag (no tracing)."""
        return parse_trace_config(self.trace_config) if self.trace_config else None

    @property
    def tensor_elements_cap(self) -> int:
        """--max-tensor-elements, by default the message limit (a tensor of 1-byte elements
        filling a message)."""
        return self.max_tensor_elements or self.grpc_max_message_bytes

    @property
    def request_bytes_cap(self) -> int:
        """--max-request-bytes, by default the message limit."""
        return self.max_request_bytes or self.grpc_max_message_bytes

    @property
    def bytes_elements_cap(self) -> int:
        """--max-bytes-elements, by default the message limit / BYTES_ELEMENT_COST."""
        return self.max_bytes_elements or max(1, self.grpc_max_message_bytes
                                              // BYTES_ELEMENT_COST)

    @property
    def queued_bytes_bound(self) -> int:
        """--max-queued-bytes, by default QUEUED_REQUESTS requests of the largest size."""
        return self.max_queued_bytes or QUEUED_REQUESTS * self.request_bytes_cap

    @property
    def arena_bytes(self) -> int:
        """--frontend-arena-bytes, by default twice the queued-bytes bound: a frontend's
        arena then holds whatever the engine would accept from it, with the messages' own
        framing and the gaps between blocks (only the pages in use take memory)."""
        if self.frontend_arena_bytes is not None:
            return self.frontend_arena_bytes
        return 2 * self.queued_bytes_bound

    def _check_security(self) -> None:
        if self.grpc_use_ssl and (self.grpc_server_cert is None or self.grpc_server_key is None):
            raise ValueError("grpc_use_ssl needs grpc_server_cert and grpc_server_key")
        if not self.grpc_use_ssl and (self.grpc_server_cert or self.grpc_server_key
                                      or self.grpc_root_cert or self.grpc_use_ssl_mutual):
            raise ValueError("grpc_server_cert, grpc_server_key, grpc_root_cert and "
                             "grpc_use_ssl_mutual need grpc_use_ssl true")
        if self.grpc_use_ssl_mutual and self.grpc_root_cert is None:
            raise ValueError("grpc_use_ssl_mutual needs grpc_root_cert (the CA that client "
                             "certificates must chain to)")
        for name in ("audit_log_max_bytes", "shm_max_regions", "shm_max_mapped_bytes"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
        if self.audit_log_backups < 0:
            raise ValueError("audit_log_backups must not be negative")
        # Parsed here too, so a mistake is one clear line at start, not a traceback later
        # (the auth file is read when the server is built: it may be mounted later).
        from server.security.ratelimit import parse_limit, parse_model_limits
        from server.security.rules import parse_restrictions

        parse_restrictions(self.grpc_restricted_protocol)
        if self.rate_limit:
            parse_limit(self.rate_limit)
        parse_model_limits(self.model_rate_limit)

    @property
    def mlflow_tracking_uri(self) -> str | None:
        """The tracking server's HTTP URI when the models come from MLflow, else None."""
        for prefix, scheme in MLFLOW_SCHEMES.items():
            if self.model_source.startswith(prefix):
                address = self.model_source.removeprefix(prefix).rstrip("/")
                return scheme + address if address else None
        return None

    @property
    def models_root(self) -> Path:
        """The local directory the served models live under: the repository, or the cache
        a remote source materialises them into."""
        return self.model_cache_dir if self.model_source else self.model_repository

    @property
    def resolved_state_file(self) -> Path:
        """Where the load set and last good versions persist: beside the models by default."""
        return self.state_file or self.models_root / ".peregrine-state.json"


OPTIONS: tuple[Option, ...] = (
    Option("model_repository", Path,
           "Model repository directory (Triton layout). Default: examples/models."),
    Option("host", str, "Address the gRPC server binds to. Default: 127.0.0.1."),
    Option("grpc_port", int, "gRPC port (0 picks a free one). Default: 8001."),
    Option("metrics_port", int, "Prometheus /metrics HTTP port (0 picks a free one). "
           "Default: 8002."),
    Option("allow_http", parse_bool,
           "Serve the Open Inference Protocol over HTTP/REST too (Triton's REST API, on "
           "--http-port), with the same TLS, tokens, roles, limits and audit as gRPC. "
           "Default: false."),
    Option("http_port", int, "HTTP/REST port (0 picks a free one). Default: 8000."),
    Option("http_address", str, "Address the HTTP/REST server binds to. Default: --host."),
    Option("http_max_connections", int,
           "HTTP/REST connections open at once (each has at most one request in flight); "
           "one more is answered 503 and closed. Default: 1024."),
    Option("allow_metrics", parse_bool, "Serve Prometheus metrics (true/false). Default: true."),
    Option("log_level", str, "Log level. Default: info.",
           ("debug", "info", "warning", "error")),
    Option("log_format", str, "Log line format: text (key=value) or json. Default: text.",
           ("text", "json")),
    Option("grpc_max_message_bytes", int,
           "Largest gRPC message accepted or sent, in bytes; larger ones get "
           "RESOURCE_EXHAUSTED. Default: 67108864 (64 MiB)."),
    Option("model_load_thread_count", int, "Threads loading models at start. Default: 4."),
    Option("exit_timeout_secs", float,
           "On SIGTERM/Ctrl-C, seconds in all to answer accepted requests; what is still "
           "queued or running then is answered UNAVAILABLE and the server exits. "
           "Default: 30."),
    Option("execution_timeout_secs", float,
           "Seconds a batch may run in a model before it is cancelled and its requests are "
           "answered DEADLINE_EXCEEDED; an instance that does not stop is quarantined. A "
           "model's execution_timeout_ms parameter overrides it; 0: no limit. Default: 30."),
    Option("strict_readiness", parse_bool,
           "ServerReady only when every model is ready (true/false). Default: true."),
    Option("uvloop", parse_bool, "Run the event loop on uvloop (true/false). Default: true."),
    Option("reflection", parse_bool, "Enable gRPC server reflection (true/false). "
           "Default: true."),
    Option("model_control_mode", str,
           "none: load every model at start, never change; poll: also apply repository "
           "changes while serving; explicit: load and unload only on request "
           "(RepositoryModelLoad/Unload, `peregrine repo load|unload`). Default: none.",
           ("none", "poll", "explicit")),
    Option("repository_poll_secs", float,
           "In poll mode, seconds between repository scans. Default: 15."),
    Option("load_model", parse_names,
           "In explicit mode, models to load at start (comma-separated; * for all)."),
    Option("grpc_header_forward_pattern", str,
           "Regular expression: request headers (gRPC metadata) whose names match it are "
           "passed to the model as string request parameters, e.g. '^x-routing-key$' for "
           "sticky routing by header. Default: none."),
    Option("state_file", Path,
           "File recording explicitly loaded models and the last versions that served well, "
           "so a restart comes back the same. Default: <model-repository>/"
           ".peregrine-state.json (<model-cache-dir>/... with a remote model source)."),
    Option("model_source", str,
           "Where models come from: empty for --model-repository (the filesystem), or an "
           "MLflow Model Registry: mlflow://HOST:PORT[/PATH] (HTTP; mlflow+https:// for "
           "HTTPS), e.g. mlflow://127.0.0.1:5000. Needs the mlflow extra "
           "(pip install 'peregrine[mlflow]'). Default: empty."),
    Option("mlflow_models", parse_names,
           "With an MLflow model source, the registered model versions to serve, "
           "comma-separated: NAME@ALIAS (follows the alias; in poll mode a moved alias is "
           "hot-swapped) or NAME/VERSION; SERVED=REF serves under another name. Several refs "
           "of one served name serve side by side. E.g. digits@champion,text/3,"
           "digits_next=digits@challenger."),
    Option("model_cache_dir", Path,
           "Where a remote model source downloads versions (<dir>/<model>/<version>/"
           "model.onnx); cached versions are reused. One server per directory. Default: "
           "$XDG_CACHE_HOME/peregrine/models (~/.cache/peregrine/models)."),
    Option("cache_config", checked_cache_config,
           "The response cache, as Triton's: local,size=<bytes> (entries bounded in bytes, "
           "least recently used evicted first). Only models whose config.pbtxt has "
           "response_cache { enable: true } use it. Default: none (no cache)."),
    Option("trace_config", parse_specs,
           "OpenTelemetry tracing, as Triton's: mode=opentelemetry, level=TIMESTAMPS, "
           "rate=N (1 in N requests; 0: only those the caller sampled), count=N (-1: no end), "
           "opentelemetry,url=HOST:PORT (OTLP/gRPC) or http://HOST:PORT/v1/traces "
           "(OTLP/HTTP), opentelemetry,resource=KEY=VALUE, opentelemetry,bsp_max_queue_size=N, "
           "opentelemetry,bsp_schedule_delay=MS, opentelemetry,bsp_max_export_batch_size=N. "
           "May be repeated. Needs the tracing extra (pip install 'peregrine[tracing]'). "
           "Default: none (no tracing).", repeatable=True),
    Option("grpc_use_ssl", parse_bool,
           "Serve gRPC over TLS; needs --grpc-server-cert and --grpc-server-key. "
           "Default: false."),
    Option("grpc_server_cert", Path,
           "PEM certificate (chain) of the gRPC listener; re-read when the file changes."),
    Option("grpc_server_key", Path,
           "PEM private key of the gRPC listener; re-read when the file changes."),
    Option("grpc_root_cert", Path,
           "PEM CA certificates that client certificates must chain to (mutual TLS)."),
    Option("grpc_use_ssl_mutual", parse_bool,
           "Require and verify a client certificate on every connection; needs "
           "--grpc-root-cert. Default: false."),
    Option("metrics_address", str,
           "Address the Prometheus /metrics endpoint binds to, apart from --host so metrics "
           "can stay private while gRPC listens publicly. Default: 127.0.0.1."),
    Option("auth_file", Path,
           "TOML file of identities (bearer tokens as salted hashes, or client-certificate "
           "names), their roles (infer, monitor, admin), models and rate limits; re-read when "
           "it changes. Without it every caller may call every RPC. See docs/security.md."),
    Option("grpc_restricted_protocol", parse_specs,
           "Triton's GROUPS:KEY=VALUE (e.g. model-repository,shared-memory:admin-key=s3cret): "
           "RPCs of those groups need that request header. May be repeated.",
           repeatable=True),
    Option("rate_limit", str,
           "Requests per second per identity, RATE[:BURST] (token bucket; the auth file may "
           "set others per identity). Default: none."),
    Option("model_rate_limit", parse_names,
           "Requests per second per model over all callers, MODEL=RATE[:BURST],... "
           "Default: none."),
    Option("audit_log", Path,
           "JSON-lines audit log of control actions and refused calls (size-rotated). "
           "Default: none."),
    Option("audit_log_max_bytes", int,
           "Size at which the audit log rotates. Default: 67108864 (64 MiB)."),
    Option("audit_log_backups", int, "Rotated audit logs kept. Default: 5."),
    Option("retrain_command", str,
           "Command run when a drift-monitored version's fixed window is at alert (and see "
           "--retrain-every-*), at most once per cool-down per version: split like a shell "
           "line, run without a shell, the JSON payload on stdin and in the file "
           "$PEREGRINE_RETRAIN_PAYLOAD. Default: none."),
    Option("retrain_url", str,
           "http(s) URL the same JSON payload is POSTed to instead of a command. "
           "Default: none."),
    Option("retrain_cooldown_secs", float,
           "Shortest time between two retrain runs of one model version. Default: 3600."),
    Option("retrain_timeout_secs", float,
           "A retrain command is killed (with what it started), or a POST abandoned, after "
           "this. Default: 300."),
    Option("retrain_every_rows", int,
           "Also run the retrain hook after this many newly sampled rows. Default: 0 (never)."),
    Option("retrain_every_secs", float,
           "Also run the retrain hook this long after its last run (or after monitoring "
           "began). Default: 0 (never)."),
    Option("allow_client_shm", parse_bool,
           "Let clients register system shared-memory regions. Default: false."),
    Option("shm_remote_registration", parse_bool,
           "Accept shared-memory registration from peers that are not on this host. "
           "Default: false."),
    Option("shm_max_regions", int,
           "Shared-memory regions one identity may hold. Default: 64."),
    Option("shm_max_mapped_bytes", int,
           "Bytes of client shared memory registered at once, over all identities. "
           "Default: 4294967296 (4 GiB)."),
    Option("max_inflight_requests", int,
           "Inference requests in flight over the whole server (accepted, answer not sent); "
           "past it RESOURCE_EXHAUSTED. Default: 4096."),
    Option("frontends", parse_frontends,
           "gRPC frontend processes sharing the port (SO_REUSEPORT) in front of one engine "
           "process that owns the models; a number, or auto (a frontend per core but one). "
           "Default: 1 (one process)."),
    Option("frontend_arena_bytes", int,
           "With --frontends, bytes of shared memory each frontend has for passing large "
           "inference requests to the engine (pages are used only as requests fill it); a "
           "unary request that finds it full is refused RESOURCE_EXHAUSTED. 0: every request "
           "goes over the frontend's socket. Default: 2 x --max-queued-bytes (2 GiB)."),
    Option("grpc_max_pending_calls", int,
           "Calls that have reached the server but that its event loop has not taken yet "
           "(it is busy); past it gRPC cancels new calls (status CANCELLED) with a "
           "probability that reaches one at twice this, before any Python work. Default: "
           "256."),
    Option("max_queue_wait_ms", float,
           "Longest predicted wait in a model's queue (rows queued ahead x the measured time "
           "per row) a request is accepted with; past it RESOURCE_EXHAUSTED at once. A model's "
           "max_queue_wait_ms parameter overrides it; 0: no limit. Default: 0."),
    Option("max_inflight_per_stream", int,
           "Requests in flight on one ModelStreamInfer call; past it the server stops "
           "reading the stream until answers leave (HTTP/2 flow control holds the client "
           "back). Default: 128."),
    Option("max_streams", int,
           "ModelStreamInfer calls open at once; past it RESOURCE_EXHAUSTED. Default: 1024."),
    Option("max_queued_bytes", int,
           "Decoded input bytes of accepted requests not yet answered, over the whole server; "
           "past it RESOURCE_EXHAUSTED. Default: 16 x --max-request-bytes (1 GiB)."),
    Option("max_tensor_elements", int,
           "Elements of one input tensor, checked before decoding; past it "
           "RESOURCE_EXHAUSTED. Default: --grpc-max-message-bytes (67108864)."),
    Option("max_request_bytes", int,
           "Bytes one request's inputs decode into (shared-memory inputs included), checked "
           "before decoding; past it RESOURCE_EXHAUSTED. Default: --grpc-max-message-bytes "
           "(67108864)."),
    Option("max_bytes_elements", int,
           "BYTES elements of one request, checked before any is decoded; past it "
           "RESOURCE_EXHAUSTED. Default: --grpc-max-message-bytes / 64 (1048576)."),
)
_BY_NAME = {option.name: option for option in OPTIONS}


def _check_typed(option: Option, raw: Any) -> None:
    """A typed TOML value must already have the option's type (strings are parsed instead)."""
    kind = option.kind
    if kind is parse_bool:
        ok, wanted = isinstance(raw, bool), "true or false"
    elif kind is int:
        ok, wanted = isinstance(raw, int) and not isinstance(raw, bool), "an integer"
    elif kind is float:
        ok, wanted = isinstance(raw, int | float) and not isinstance(raw, bool), "a number"
    elif kind is parse_names or kind is parse_specs:
        ok = isinstance(raw, list) and all(isinstance(v, str) for v in raw)
        wanted = "a list of strings"
    else:
        ok, wanted = False, "a string"
    if not ok:
        raise ValueError(f"expected {wanted}, got {raw!r}")


def _convert(option: Option, raw: Any, source: str) -> Any:
    try:
        if not isinstance(raw, str):
            _check_typed(option, raw)
        value = raw if not isinstance(raw, str) else option.kind(raw)
        if option.kind in (parse_names, parse_specs) and isinstance(value, list):
            value = tuple(str(v) for v in value)
        if option.kind is Path:
            value = Path(value)
        elif option.kind is float and isinstance(value, int):
            value = float(value)
    except ValueError as exc:
        raise ValueError(f"{source}: {exc}") from None
    if option.choices and value not in option.choices:
        raise ValueError(f"{source}: must be one of {', '.join(option.choices)}, got '{value}'")
    return value


def load_settings(
    flags: Mapping[str, Any],
    environ: Mapping[str, str] | None = None,
    config_file: Path | None = None,
) -> ServerSettings:
    """Merge the sources; ``flags`` holds only the options given on the command line."""
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    file_path = config_file or (
        Path(environ[ENV_PREFIX + "CONFIG_FILE"]) if environ.get(ENV_PREFIX + "CONFIG_FILE")
        else None
    )
    if file_path is not None:
        try:
            table = tomllib.loads(file_path.read_text(encoding="utf-8"))
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ValueError(f"config file {file_path}: {exc}") from None
        table = table.get("server", table)
        for key, raw in table.items():
            option = _BY_NAME.get(key.replace("-", "_"))
            if option is None:
                raise ValueError(f"config file {file_path}: unknown option '{key}'")
            values[option.name] = _convert(option, raw, f"config file {file_path} '{key}'")
    for option in OPTIONS:
        if option.env in environ:
            values[option.name] = _convert(option, environ[option.env], option.env)
    for name, raw in flags.items():
        if raw is not None:
            option = _BY_NAME[name]
            values[name] = _convert(option, raw, option.flag)
    return ServerSettings(**values)
