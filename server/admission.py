"""The server-wide bounds on inference work: requests in flight, open streams and the bytes
of queued request data (docs/configuration.md, "Bounds").

A request is in flight from the moment it is accepted (decoded, within the caps, queued)
until its answer is handed to gRPC: for a unary call when the handler returns, for a stream
when the answer leaves the stream's buffer, or when the call ends without it. Its decoded
bytes count from acceptance until its answer is computed (then the inputs are dropped). The
frontend releases each exactly once on every path: answer, error, cancellation, closed
stream.

Only the event loop thread changes the counts and the metrics thread only reads them, so they
are plain integers: admitting a request is two compares and two adds, no object.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from server.errors import BoundExceeded


@dataclass(frozen=True, slots=True)
class Bounds:
    """The flags --max-inflight-requests, --max-inflight-per-stream, --max-streams and
    --max-queued-bytes (the settings hold their defaults)."""

    max_inflight_requests: int
    max_inflight_per_stream: int
    max_streams: int
    max_queued_bytes: int


def _uncounted(bound: str) -> None:
    """No refusal counter (tools and tests that build a servicer without metrics)."""


class Admission:
    """The counts under the bounds. ``on_refused`` counts a refusal by the bound's name."""

    __slots__ = ("_max_bytes", "_max_inflight", "_on_refused", "bounds", "inflight",
                 "queued_bytes", "streams")

    def __init__(self, bounds: Bounds, on_refused: Callable[[str], None] = _uncounted) -> None:
        self.bounds = bounds
        self._max_inflight = bounds.max_inflight_requests
        self._max_bytes = bounds.max_queued_bytes
        self._on_refused = on_refused
        self.inflight = 0
        self.streams = 0
        self.queued_bytes = 0

    def check_room(self) -> None:
        """Refuse at once, before the request is even decoded, when the server is full."""
        if self.inflight >= self._max_inflight:
            raise BoundExceeded(
                "max_inflight_requests",
                f"server has {self.inflight} requests in flight (--max-inflight-requests)")

    def admit(self, nbytes: int) -> None:
        """Accept a request whose inputs decoded into ``nbytes``; the caller releases both
        counts exactly once (``release_requests``, ``release_bytes``)."""
        self.check_room()
        if self.queued_bytes + nbytes > self._max_bytes:
            raise BoundExceeded(
                "max_queued_bytes",
                f"server holds {self.queued_bytes} bytes of queued request data and the "
                f"request brings {nbytes} more; the bound is {self._max_bytes} "
                "(--max-queued-bytes)")
        self.inflight += 1
        self.queued_bytes += nbytes

    def release_requests(self, count: int) -> None:
        self.inflight -= count

    def release_bytes(self, nbytes: int) -> None:
        self.queued_bytes -= nbytes

    def open_stream(self) -> None:
        if self.streams >= self.bounds.max_streams:
            raise BoundExceeded(
                "max_streams", f"server has {self.streams} streams open (--max-streams)")
        self.streams += 1

    def close_stream(self) -> None:
        self.streams -= 1

    def refused(self, bound: str) -> None:
        """Count a refusal past ``bound`` (a BoundExceeded's name): this module's bounds,
        the request caps and a model's max_queue_size alike."""
        self._on_refused(bound)
