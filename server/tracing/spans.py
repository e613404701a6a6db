"""A request's trace record -> its OTLP spans, in the exporter's thread.

The spans of one request (a batch serves several requests: each traced request gets its own
``batch`` and ``compute`` spans, children of its own request span, with the batch's times and
size, so every trace reads whole on its own)::

    InferRequest   SERVER: the call's handling of the request (a unary call from its start,
    │              a streamed request from its decoding) until its answer is written;
    │              child of the caller's span when it sent a traceparent
    ├── queue      enqueued -> its batch started
    ├── batch      the batch it ran in: started -> answered (batch_size rows, batch_requests)
    │   └── compute  one backend call: pack -> execute -> unpack, with Triton's compute
    │                timestamps as events (COMPUTE_START, COMPUTE_INPUT_END,
    │                COMPUTE_OUTPUT_START, COMPUTE_END)
    └── encode     the response written

Attributes use Triton's names (``model_name``, ``model_version``, ``request_id``) and
OpenTelemetry's RPC conventions (``rpc.system``, ``rpc.method``, ``rpc.grpc.status_code``); a
request that failed has status ERROR with the message its caller got.

Spans are built as plain dicts in the OTLP message layout and made into messages once per
export batch (``ScopeSpans(spans=...)``): the protobuf runtime then builds the nested messages
in C, about five times faster than building each message from Python.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Iterable
from typing import Any

import grpc

from server.tracing.trace import RequestTrace

SERVICE = "inference.GRPCInferenceService"
#: W3C sampled flag, and OTLP's "whether the parent is remote is known" and "is remote" bits.
_SAMPLED = 0x01
_HAS_IS_REMOTE = 0x100
_IS_REMOTE = 0x200
#: OTLP's SpanKind and Status.StatusCode values.
_INTERNAL, _SERVER = 1, 2
_ERROR = 2

SpanDict = dict[str, Any]


def attributes(pairs: Iterable[tuple[str, str | int]]) -> list[dict[str, Any]]:
    """KeyValue messages, as dicts."""
    return [{"key": key, "value": {"int_value": value} if isinstance(value, int)
             else {"string_value": value}} for key, value in pairs]


class SpanBuilder:
    """Turns records into spans: ids drawn here, times moved from the monotonic clock the
    server records with onto the Unix epoch OTLP wants (the offset read once, at start)."""

    def __init__(self) -> None:
        self._offset = time.time_ns() - time.perf_counter_ns()
        self._random = random.Random(os.urandom(16))

    def _id(self, bits: int) -> bytes:
        value = 0
        while not value:
            value = self._random.getrandbits(bits)
        return value.to_bytes(bits // 8, "big")

    def spans(self, trace: RequestTrace) -> list[SpanDict]:
        offset = self._offset
        parent = trace.call.parent
        if parent is not None:
            trace_id = parent.trace_id.to_bytes(16, "big")
            remote_span = parent.span_id.to_bytes(8, "big")
            state = parent.tracestate
        else:
            trace_id, remote_span, state = self._id(128), b"", ""
        model = (("model_name", trace.model), ("model_version", trace.version))
        root_id = self._id(64)

        def child(name: str, parent_id: bytes, start: int, end: int,
                  pairs: Iterable[tuple[str, str | int]] = ()) -> SpanDict:
            return {"trace_id": trace_id, "span_id": self._id(64), "trace_state": state,
                    "parent_span_id": parent_id, "flags": _SAMPLED | _HAS_IS_REMOTE,
                    "name": name, "kind": _INTERNAL, "start_time_unix_nano": start + offset,
                    "end_time_unix_nano": end + offset, "attributes": attributes(pairs)}

        code: grpc.StatusCode = trace.code
        root: SpanDict = {
            "trace_id": trace_id, "span_id": root_id, "trace_state": state,
            "parent_span_id": remote_span,
            "flags": _SAMPLED | _HAS_IS_REMOTE | (_IS_REMOTE if parent is not None else 0),
            "name": "InferRequest", "kind": _SERVER,
            "start_time_unix_nano": trace.start_ns + offset,
            "end_time_unix_nano": trace.end_ns + offset,
            "attributes": attributes((*model, ("request_id", trace.request_id),
                                      ("rpc.system", "grpc"), ("rpc.service", SERVICE),
                                      ("rpc.method", trace.call.method),
                                      ("rpc.grpc.status_code", code.value[0]))),
        }
        if code is not grpc.StatusCode.OK:
            root["status"] = {"code": _ERROR, "message": trace.message}
        spans = [root]
        batch = trace.batch
        if batch is not None:
            spans.append(child("queue", root_id, trace.enqueue_ns, batch.start_ns, model))
            batch_span = child("batch", root_id, batch.start_ns, batch.end_ns,
                               (*model, ("batch_size", batch.rows),
                                ("batch_requests", batch.requests)))
            spans.append(batch_span)
            for call in batch.executions:
                inputs_end = call.start_ns + call.input_ns
                outputs_start = inputs_end + call.infer_ns
                end = outputs_start + call.output_ns
                compute = child("compute", batch_span["span_id"], call.start_ns, end,
                                (*model, ("batch_size", call.rows)))
                compute["events"] = [
                    {"name": event, "time_unix_nano": at + offset}
                    for event, at in (("COMPUTE_START", call.start_ns),
                                      ("COMPUTE_INPUT_END", inputs_end),
                                      ("COMPUTE_OUTPUT_START", outputs_start),
                                      ("COMPUTE_END", end))]
                spans.append(compute)
        if trace.encode_end_ns:
            spans.append(child("encode", root_id, trace.encode_start_ns, trace.encode_end_ns))
        return spans
