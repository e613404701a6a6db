"""``--trace-config``, as Triton's: parsed and checked once at start.

Global entries are ``<setting>=<value>`` (``mode``, ``level``, ``rate``, ``count``); the
exporter's are ``opentelemetry,<setting>=<value>`` (``url``, ``resource``,
``bsp_max_queue_size``, ``bsp_schedule_delay``, ``bsp_max_export_batch_size``). Only
Triton's OpenTelemetry mode is offered: its file mode (``mode=triton``, ``triton,file=...``)
and the ``TENSORS`` level are refused with a message that says so.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

OPENTELEMETRY = "opentelemetry"
TIMESTAMPS = "TIMESTAMPS"
OFF = "OFF"
#: Triton's defaults.
DEFAULT_RATE = 1000
DEFAULT_COUNT = -1
DEFAULT_URL = "http://localhost:4318/v1/traces"
DEFAULT_SERVICE_NAME = "peregrine"
DEFAULT_MAX_QUEUE_SIZE = 2048
DEFAULT_SCHEDULE_DELAY_MS = 5000
DEFAULT_MAX_EXPORT_BATCH_SIZE = 512
EXTRA_MISSING = "tracing needs its extra: pip install 'peregrine[tracing]'"

_GLOBAL: tuple[str, ...] = ("mode", "level", "rate", "count")
_EXPORTER: tuple[str, ...] = ("url", "resource", "bsp_max_queue_size", "bsp_schedule_delay",
             "bsp_max_export_batch_size")


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Where spans go. ``grpc``: OTLP/gRPC to ``target`` (host:port), TLS when ``secure``;
    ``http``: OTLP/HTTP (protobuf body) POSTed to the URL ``target``, as Triton exports."""

    protocol: str
    target: str
    secure: bool = False

    def __str__(self) -> str:
        return self.target if self.protocol == "http" else f"grpc://{self.target}"


@dataclass(frozen=True, slots=True)
class TraceConfig:
    #: True for level TIMESTAMPS; with OFF (Triton's default) no request is traced.
    timestamps: bool
    rate: int
    count: int
    endpoint: Endpoint
    #: Resource attributes of every span, service.name first.
    resource: tuple[tuple[str, str], ...]
    max_queue_size: int
    schedule_delay_ms: int
    max_export_batch_size: int


def parse_endpoint(url: str) -> Endpoint:
    """``host:port`` or ``http://host:port`` (no path): OTLP/gRPC, the collector's port 4317
    (``https://`` with TLS); a URL with a path (``http://host:4318/v1/traces``, Triton's
    form): OTLP/HTTP."""
    text = url.strip()
    if "://" not in text:
        text = "http://" + text
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"url must be host:port or http(s)://host:port[/v1/traces], "
                         f"got '{url}'")
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"url has a bad port: '{url}'") from None
    secure = parts.scheme == "https"
    if parts.path not in ("", "/"):
        return Endpoint("http", text, secure)
    if port is None:
        raise ValueError(f"url '{url}' names no port (the OTLP/gRPC collector port is 4317)")
    return Endpoint("grpc", parts.netloc, secure)


def _integer(name: str, text: str, least: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"{name} must be an integer, got '{text}'") from None
    if value < least:
        raise ValueError(f"{name} must be at least {least}, got {value}")
    return value


def parse_level(values: Sequence[str]) -> bool:
    """Triton's trace levels -> whether timestamps are traced (OFF alone: no)."""
    timestamps = False
    for value in values:
        level = value.strip().upper()
        if level == "TENSORS":
            raise ValueError("level TENSORS is not supported in opentelemetry mode "
                             "(as in Triton): use TIMESTAMPS")
        if level not in (OFF, TIMESTAMPS):
            raise ValueError(f"level must be OFF or TIMESTAMPS, got '{value}'")
        timestamps = timestamps or level == TIMESTAMPS
    return timestamps


def parse_rate(text: str) -> int:
    """1 in ``rate`` requests traced; 0: only those whose caller sampled them."""
    return _integer("rate", text, 0)


def parse_count(text: str) -> int:
    """Traces left to take by rate; -1: no end."""
    return _integer("count", text, -1)


def parse_trace_config(entries: Sequence[str]) -> TraceConfig:
    """The entries of the repeated flag, in order (a later entry of a setting wins, but
    ``level`` and ``resource`` add up); ValueError names the entry at fault."""
    settings: dict[str, str] = {}
    levels: list[str] = []
    resource: dict[str, str] = {}
    for entry in entries:
        scope, comma, rest = entry.partition(",")
        if comma and "=" not in scope:
            if scope.strip() == "triton":
                raise ValueError(f"'{entry}': Triton's trace file mode is not offered; "
                                 "Peregrine traces with OpenTelemetry only")
            if scope.strip() != OPENTELEMETRY:
                raise ValueError(f"'{entry}': the mode-specific form is "
                                 "opentelemetry,<setting>=<value>")
            allowed, text = _EXPORTER, rest
        else:
            allowed, text = _GLOBAL, entry
        key, equals, value = text.partition("=")
        key, value = key.strip(), value.strip()
        if not equals or key not in allowed:
            raise ValueError(f"'{entry}': unknown setting '{key}'; "
                             f"settings are {', '.join(_GLOBAL)} and opentelemetry,"
                             f"{{{', '.join(_EXPORTER)}}}")
        if key == "level":
            levels.append(value)
        elif key == "resource":
            name, equals, attribute = value.partition("=")
            if not equals or not name.strip():
                raise ValueError(f"'{entry}': resource takes key=value, e.g. "
                                 "resource=service.name=ranker")
            resource[name.strip()] = attribute.strip()
        else:
            settings[key] = value
    mode = settings.get("mode", "triton")
    if mode != OPENTELEMETRY:
        raise ValueError(f"mode must be opentelemetry (Triton's default, triton, writes a "
                         f"trace file, which is not offered); got '{mode}': add "
                         "--trace-config mode=opentelemetry")
    queue_size = _integer("bsp_max_queue_size",
                          settings.get("bsp_max_queue_size", str(DEFAULT_MAX_QUEUE_SIZE)), 1)
    batch_size = _integer("bsp_max_export_batch_size",
                          settings.get("bsp_max_export_batch_size",
                                       str(min(DEFAULT_MAX_EXPORT_BATCH_SIZE, queue_size))), 1)
    if batch_size > queue_size:
        raise ValueError(f"bsp_max_export_batch_size ({batch_size}) must not exceed "
                         f"bsp_max_queue_size ({queue_size})")
    resource.setdefault("service.name", DEFAULT_SERVICE_NAME)
    return TraceConfig(
        timestamps=parse_level(levels),
        rate=parse_rate(settings.get("rate", str(DEFAULT_RATE))),
        count=parse_count(settings.get("count", str(DEFAULT_COUNT))),
        endpoint=parse_endpoint(settings.get("url", DEFAULT_URL)),
        resource=(("service.name", resource.pop("service.name")), *sorted(resource.items())),
        max_queue_size=queue_size,
        schedule_delay_ms=_integer("bsp_schedule_delay", settings.get(
            "bsp_schedule_delay", str(DEFAULT_SCHEDULE_DELAY_MS)), 1),
        max_export_batch_size=batch_size,
    )


def check_extra() -> None:
    """ValueError (one line: what to install) when the OTLP messages are not importable."""
    if importlib.util.find_spec("opentelemetry") is None \
            or importlib.util.find_spec("opentelemetry.proto") is None:
        raise ValueError(EXTRA_MISSING)
