"""Ended traces -> OTLP, in batches, from one background thread (Triton's batch span
processor settings).

The event loop only appends an ended trace to a bounded queue (``offer``): past
``bsp_max_queue_size`` spans' worth the trace is dropped and counted, never waited for. The
thread wakes every ``bsp_schedule_delay`` ms, or as soon as a batch's worth
(``bsp_max_export_batch_size`` spans) is queued, turns the traces into spans and sends them:
OTLP/gRPC (``url=host:port``) or OTLP/HTTP with a protobuf body (``url=http://host:port/
v1/traces``, Triton's exporter). A failed export drops its spans (counted; logged when exports
start failing and when they work again): the server never retries into a collector that is
down. What is queued at stop is sent within the exit timeout.

A lean exporter of our own on the OTLP messages rather than OpenTelemetry's SDK: the SDK's
span objects cost the loop about 100 us per traced request (5 spans), where recording ours
costs a few microseconds and the rest happens here.
"""

from __future__ import annotations

import logging
import threading
import urllib.request
from collections import deque
from typing import Protocol

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
from opentelemetry.proto.common.v1.common_pb2 import InstrumentationScope
from opentelemetry.proto.resource.v1.resource_pb2 import Resource
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans

from server import __version__
from server.tracing.config import Endpoint, TraceConfig
from server.tracing.spans import SpanBuilder, attributes
from server.tracing.trace import RequestTrace

log = logging.getLogger(__name__)

#: The spans of a request that ran in a batch (spans.py), for sizing the queue and batches
#: that Triton's settings count in spans.
SPANS_PER_REQUEST = 5
EXPORT_TIMEOUT_S = 10.0
EXPORT_METHOD = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"


class Transport(Protocol):
    def send(self, request: trace_service_pb2.ExportTraceServiceRequest) -> None: ...

    def close(self) -> None: ...


class GrpcTransport:
    def __init__(self, endpoint: Endpoint) -> None:
        self._channel = (grpc.secure_channel(endpoint.target, grpc.ssl_channel_credentials())
                         if endpoint.secure else grpc.insecure_channel(endpoint.target))
        self._export = self._channel.unary_unary(
            EXPORT_METHOD,
            request_serializer=trace_service_pb2.ExportTraceServiceRequest.SerializeToString,
            response_deserializer=trace_service_pb2.ExportTraceServiceResponse.FromString)

    def send(self, request: trace_service_pb2.ExportTraceServiceRequest) -> None:
        self._export(request, timeout=EXPORT_TIMEOUT_S)

    def close(self) -> None:
        self._channel.close()


class HttpTransport:
    def __init__(self, endpoint: Endpoint) -> None:
        self._url = endpoint.target

    def send(self, request: trace_service_pb2.ExportTraceServiceRequest) -> None:
        post = urllib.request.Request(self._url, data=request.SerializeToString(),
                                      headers={"Content-Type": "application/x-protobuf"},
                                      method="POST")
        with urllib.request.urlopen(post, timeout=EXPORT_TIMEOUT_S) as answer:
            answer.read()

    def close(self) -> None:
        pass


def transport_for(endpoint: Endpoint) -> Transport:
    return GrpcTransport(endpoint) if endpoint.protocol == "grpc" else HttpTransport(endpoint)


class SpanExporter:
    def __init__(self, config: TraceConfig) -> None:
        self._endpoint = config.endpoint
        self._queue: deque[RequestTrace] = deque()
        self._max_traces = max(1, config.max_queue_size // SPANS_PER_REQUEST)
        self._batch_traces = max(1, config.max_export_batch_size // SPANS_PER_REQUEST)
        self._delay_s = config.schedule_delay_ms / 1000
        self._resource = Resource(attributes=attributes(config.resource))  # type: ignore[arg-type]
        self._scope = InstrumentationScope(name="peregrine", version=__version__)
        self._transport = transport_for(config.endpoint)
        self._wake = threading.Event()
        self._stopping = False
        self._failing = False
        #: Spans dropped because the queue was full (written by the loop), sent, and lost to
        #: failed exports (written by the thread): read at scrape time.
        self.dropped_spans = 0
        self.exported_spans = 0
        self.failed_spans = 0
        self._thread = threading.Thread(target=self._run, name="trace-export", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def offer(self, trace: RequestTrace) -> None:
        """On the event loop: queue an ended trace, or drop it when the queue is full."""
        queue = self._queue
        if len(queue) >= self._max_traces:
            self.dropped_spans += trace.span_count
            return
        queue.append(trace)
        if len(queue) == self._batch_traces:
            self._wake.set()

    def close(self, timeout: float) -> None:
        """Send what is queued (for at most ``timeout`` seconds), then stop the thread."""
        self._stopping = True
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout)
        self._transport.close()

    def _run(self) -> None:
        builder = SpanBuilder()
        while True:
            self._wake.wait(self._delay_s)
            self._wake.clear()
            stopping = self._stopping
            queue = self._queue
            while queue:
                batch = [queue.popleft() for _ in range(min(len(queue), self._batch_traces))]
                self._export(builder, batch)
            if stopping:
                return

    def _export(self, builder: SpanBuilder, batch: list[RequestTrace]) -> None:
        spans = []
        try:
            for trace in batch:
                spans.extend(builder.spans(trace))
            self._transport.send(trace_service_pb2.ExportTraceServiceRequest(resource_spans=[
                ResourceSpans(resource=self._resource, scope_spans=[
                    ScopeSpans(scope=self._scope, spans=spans)])]))  # type: ignore[arg-type]
        except Exception as exc:  # the thread outlives any one export
            self.failed_spans += sum(trace.span_count for trace in batch)
            if not self._failing:
                self._failing = True
                log.warning("trace export failed; spans are dropped until it works again",
                            extra={"endpoint": str(self._endpoint), "error": _reason(exc)})
            return
        self.exported_spans += len(spans)
        if self._failing:
            self._failing = False
            log.info("trace export works again", extra={"endpoint": str(self._endpoint)})


def _reason(exc: Exception) -> str:
    if isinstance(exc, grpc.RpcError):
        return f"{exc.code().name}: {exc.details()}"
    return repr(exc)
