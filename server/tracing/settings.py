"""The trace settings that can change while serving, as Triton's TraceSetting RPC has them.

``trace_level``, ``trace_rate`` and ``trace_count`` are read and updated here (global only:
per-model settings are refused); ``trace_mode`` is reported. The same object makes the rate
decision for each request without a sampled caller, so an update applies to the next request.
Runs on the event loop thread; takes no lock.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from server.errors import InvalidInput, NotAllowed, Unsupported
from server.tracing.config import (
    DEFAULT_COUNT,
    DEFAULT_RATE,
    OFF,
    OPENTELEMETRY,
    TIMESTAMPS,
    TraceConfig,
    parse_count,
    parse_level,
    parse_rate,
)

LEVEL, RATE, COUNT, MODE = "trace_level", "trace_rate", "trace_count", "trace_mode"
#: Triton's trace-file settings, which its OpenTelemetry mode does not use either.
_FILE_SETTINGS = ("trace_file", "log_frequency")
NOT_CONFIGURED = ("tracing is not configured: start the server with --trace-config "
                  "mode=opentelemetry --trace-config level=TIMESTAMPS (docs/configuration.md)")


class TraceSettings:
    """``config`` is None when the server runs without tracing: the settings then read as
    Triton's defaults with level OFF, and an update other than keeping the level OFF is
    refused, FAILED_PRECONDITION naming --trace-config (no request path was set up to be
    traced, and none is built while serving)."""

    def __init__(self, config: TraceConfig | None) -> None:
        self.configured = config is not None
        self._initial = ((config.timestamps, config.rate, config.count) if config is not None
                         else (False, DEFAULT_RATE, DEFAULT_COUNT))
        self.timestamps, self.rate, self.count = self._initial
        #: Requests seen since the last one taken by rate.
        self._seen = 0

    def by_rate(self) -> bool:
        """Whether the next request without a sampled caller is traced: every rate-th while
        the count lasts (Triton's rate and count)."""
        if not self.timestamps or not self.rate or not self.count:
            return False
        self._seen += 1
        if self._seen < self.rate:
            return False
        self._seen = 0
        if self.count > 0:
            self.count -= 1
        return True

    def report(self) -> dict[str, list[str]]:
        return {
            MODE: [OPENTELEMETRY],
            LEVEL: [TIMESTAMPS if self.timestamps else OFF],
            RATE: [str(self.rate)],
            COUNT: [str(self.count)],
        }

    def update(self, model_name: str, changes: Mapping[str, Sequence[str]]) -> None:
        """Apply TraceSetting's changes (all or none); an empty value list restores the
        setting given at start. Reading (no changes) never fails."""
        if not changes:
            return
        if not self.configured:
            if all(key == LEVEL and all(v == OFF for v in values)
                   for key, values in changes.items()):
                return  # tracing stays off, as asked
            raise NotAllowed(NOT_CONFIGURED)
        if model_name:
            raise Unsupported("per-model trace settings are not supported: leave model_name "
                              "empty to change the global settings")
        timestamps, rate, count = self.timestamps, self.rate, self.count
        for key, values in changes.items():
            if key in _FILE_SETTINGS:
                raise Unsupported(f"{key} is a setting of Triton's trace file mode; Peregrine "
                                  "traces with OpenTelemetry only")
            if key == MODE:
                if list(values) not in ([], [OPENTELEMETRY]):
                    raise Unsupported(f"{MODE} is {OPENTELEMETRY} only")
                continue
            if key not in (LEVEL, RATE, COUNT):
                raise InvalidInput(f"unknown trace setting '{key}'; the settings are "
                                   f"{LEVEL}, {RATE}, {COUNT}, {MODE}")
            try:
                if key == LEVEL:
                    timestamps = parse_level(values) if values else self._initial[0]
                elif len(values) > 1:
                    raise ValueError(f"{key} takes one value, got {len(values)}")
                elif key == RATE:
                    rate = parse_rate(values[0]) if values else self._initial[1]
                else:
                    count = parse_count(values[0]) if values else self._initial[2]
            except ValueError as exc:
                raise InvalidInput(f"{key}: {exc}") from None
        if rate != self.rate:
            self._seen = 0
        self.timestamps, self.rate, self.count = timestamps, rate, count
