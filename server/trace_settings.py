"""TraceSetting while tracing is off: what the RPC answers when no tracer is configured.

Tracing is configured when the server starts (``--trace-config``, Triton's flag); this
stand-in reports ``trace_level: ["OFF"]`` and refuses any change that would need a tracer,
saying so. The tracing component replaces it (``interfaces.TraceSettings``) when one is
configured.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from server.errors import NotAllowed

LEVEL = "trace_level"
OFF = "OFF"


class TracingOff:
    """``interfaces.TraceSettings`` for a server without a tracer."""

    def settings(self, model: str) -> dict[str, list[str]]:
        return {LEVEL: [OFF]}

    def update(self, model: str, changes: Mapping[str, Sequence[str]]) -> dict[str, list[str]]:
        for key, values in changes.items():
            if key != LEVEL or any(value != OFF for value in values):
                shown = f"{key}={list(values)}"
                raise NotAllowed(
                    f"tracing is off on this server, so TraceSetting cannot apply {shown}: "
                    "tracing is turned on when the server starts, with --trace-config "
                    "(e.g. --trace-config mode=opentelemetry)")
        return self.settings(model)
