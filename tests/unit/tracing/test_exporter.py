"""The trace exporter without a server: OTLP/HTTP to a real HTTP receiver, the bounded
queue, failed exports counted, and a record's spans when no caller sent a context."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.trace.v1.trace_pb2 import ScopeSpans, Span

from server.tracing.config import parse_trace_config
from server.tracing.exporter import SpanExporter
from server.tracing.spans import SpanBuilder
from server.tracing.trace import BatchRecord, CallTrace, RequestTrace
from server.types import Execution

OTEL = ("mode=opentelemetry", "level=TIMESTAMPS")


def record(sink: object = print, batched: bool = True) -> RequestTrace:
    trace = RequestTrace(CallTrace("ModelInfer", None, stream=False), sink,  # type: ignore[arg-type]
                         1_000)
    trace.model, trace.version, trace.request_id = "m", "1", "r"
    if batched:
        trace.enqueue_ns = 2_000
        trace.batch = BatchRecord(3_000, 9_000, 4, 2, (
            Execution(2, 1, 100, 200, 300, 0, 3_100), Execution(2, 1, 100, 200, 300, 0, 5_000)))
    return trace


class _Collector(BaseHTTPRequestHandler):
    bodies: list[tuple[str, bytes]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        type(self).bodies.append((self.path, body))
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def http_collector() -> Iterator[tuple[str, list[tuple[str, bytes]]]]:
    _Collector.bodies = []
    httpd = HTTPServer(("127.0.0.1", 0), _Collector)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/v1/traces", _Collector.bodies
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_otlp_http_as_triton_exports(http_collector: tuple[str, list[tuple[str, bytes]]]
                                     ) -> None:
    url, bodies = http_collector
    exporter = SpanExporter(parse_trace_config((*OTEL, f"opentelemetry,url={url}")))
    exporter.start()
    trace = record(exporter.offer)
    trace.finish(grpc.StatusCode.OK)
    exporter.close(timeout=30)  # what is queued at stop is sent
    assert [path for path, _ in bodies] == ["/v1/traces"]
    sent = ExportTraceServiceRequest.FromString(bodies[0][1])
    spans = sent.resource_spans[0].scope_spans[0].spans
    assert sorted(s.name for s in spans) == ["InferRequest", "batch", "compute", "compute",
                                             "queue"]
    assert exporter.exported_spans == len(spans) == trace.span_count
    assert exporter.failed_spans == exporter.dropped_spans == 0


def test_a_full_queue_drops_and_counts() -> None:
    # 10 spans' worth is two requests' traces; the exporter is not started, so none leaves.
    exporter = SpanExporter(parse_trace_config((*OTEL, "opentelemetry,url=127.0.0.1:1",
                                                "opentelemetry,bsp_max_queue_size=10")))
    traces = [record(exporter.offer) for _ in range(3)]
    for trace in traces:
        trace.finish(grpc.StatusCode.OK)
    assert exporter.dropped_spans == traces[2].span_count
    exporter.close(timeout=0)


def test_a_failed_export_is_counted_and_the_thread_goes_on() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # closed again: nothing listens there
    exporter = SpanExporter(parse_trace_config((*OTEL, f"opentelemetry,url=127.0.0.1:{port}")))
    exporter.start()
    first, second = record(exporter.offer), record(exporter.offer, batched=False)
    first.finish(grpc.StatusCode.OK)
    second.finish(grpc.StatusCode.OK)
    exporter.close(timeout=30)
    assert exporter.failed_spans == first.span_count + second.span_count
    assert exporter.exported_spans == 0


def test_a_request_without_a_caller_starts_its_own_trace() -> None:
    trace = record(batched=False)
    trace.end_ns = 5_000
    trace.code, trace.message = grpc.StatusCode.NOT_FOUND, "no model 'm'"
    spans = ScopeSpans(spans=SpanBuilder().spans(trace)).spans
    assert [s.name for s in spans] == ["InferRequest"]
    root = spans[0]
    assert len(root.trace_id) == 16 and any(root.trace_id)
    assert root.parent_span_id == b"" and root.kind == Span.SPAN_KIND_SERVER
    assert root.status.message == "no model 'm'"
    assert root.end_time_unix_nano - root.start_time_unix_nano == 4_000
