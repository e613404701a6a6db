"""The caller's trace context: W3C Trace Context headers (``traceparent``, ``tracestate``)
from a call's gRPC metadata (HTTP headers arrive there too). A malformed ``traceparent`` is
ignored, as the W3C recommendation says: the request is then traced as if none was sent.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

TRACEPARENT = "traceparent"
TRACESTATE = "tracestate"
#: W3C: a tracestate longer than this may be dropped rather than passed on.
MAX_TRACESTATE = 512
_HEX = frozenset("0123456789abcdef")


@dataclass(frozen=True, slots=True)
class RemoteParent:
    trace_id: int
    span_id: int
    #: The caller's sampled flag: it records this trace, so we do too.
    sampled: bool
    tracestate: str = ""


def parse_traceparent(value: str, tracestate: str = "") -> RemoteParent | None:
    """``version-traceid-parentid-flags`` (lowercase hex); None when it is not valid. A later
    version than 00 is read by its first four fields, as the recommendation asks."""
    if len(value) < 55 or value[2] != "-" or value[35] != "-" or value[52] != "-":
        return None
    version, trace_id, span_id, flags = value[:2], value[3:35], value[36:52], value[53:55]
    if not _HEX.issuperset(value[:2] + trace_id + span_id + flags) or version == "ff":
        return None
    if len(value) > 55 and (version == "00" or value[55] != "-"):
        return None
    trace, span = int(trace_id, 16), int(span_id, 16)
    if not trace or not span:
        return None
    if len(tracestate) > MAX_TRACESTATE:
        tracestate = ""
    return RemoteParent(trace, span, bool(int(flags, 16) & 1), tracestate)


def remote_parent(metadata: Iterable[tuple[str, str | bytes]] | None) -> RemoteParent | None:
    """The caller's context from a call's metadata; None without (a valid) one. Several
    tracestate entries are joined with commas, as HTTP joins repeated headers."""
    parent = None
    states: list[str] = []
    for key, value in metadata or ():
        if key == TRACEPARENT and isinstance(value, str):
            parent = value.strip()
        elif key == TRACESTATE and isinstance(value, str):
            states.append(value.strip())
    if parent is None:
        return None
    return parse_traceparent(parent, ",".join(states))
