"""The server's bounds (server.admission): what is in flight, read at scrape time (nothing is
written per request), and the refusals by bound (labels: the bounds' names, a fixed set)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge


class AdmissionMetrics:
    def __init__(self, registry: CollectorRegistry, inflight: Callable[[], int],
                 streams: Callable[[], int], queued_bytes: Callable[[], int]) -> None:
        for name, documentation, read in (
            ("peregrine_inflight_requests",
             "Inference requests accepted whose answer has not been handed to gRPC yet "
             "(bound: --max-inflight-requests).", inflight),
            ("peregrine_open_streams",
             "ModelStreamInfer calls open (bound: --max-streams).", streams),
            ("peregrine_queued_request_bytes",
             "Decoded input bytes of accepted requests not yet answered "
             "(bound: --max-queued-bytes).", queued_bytes),
        ):
            Gauge(name, documentation, registry=registry).set_function(read)
        self._refused = Counter(
            "peregrine_refused", "Inference requests and streams refused past a bound, by "
            "the bound (a flag's name, or max_queue_size).", ("bound",), registry=registry)

    def refused(self, bound: str) -> None:
        self._refused.labels(bound).inc()
