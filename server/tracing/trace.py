"""What is recorded of a traced request, and the tracer that samples and fills the records.

Everything here runs on the event loop thread and records only integers and references: a
sampled request costs a small object and a few clock reads; the spans are built from it by
the exporter's thread (server/tracing/spans.py). Where each piece comes from:

- the frontend's wrapper (server/frontend/tracing.py) reads the caller's context from a
  call's metadata, samples a unary call's request and ends its trace; a stream gets a
  ``CallTrace``;
- the wrapped codec (server/tracing/codec.py) samples each streamed request as it decodes
  it, times every traced request's encoding and ends a streamed request's trace;
- the batcher (``Tracer.batch_done``, once per batch) gives its enqueue time, the batch's
  start and end, its size and its backend calls.

The call and the request travel in context variables: grpc.aio runs each call in its own task,
a stream's reader task inherits the call's, and a stream's answer callback runs in the context
its request was decoded in. Only these modules read them, and only when tracing is on.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from contextvars import ContextVar
from typing import NamedTuple

import grpc

from server.interfaces import QueuedRequest
from server.tracing.context import RemoteParent, remote_parent
from server.tracing.settings import TraceSettings
from server.types import Execution, InferRequest, InferResponse

_now = time.perf_counter_ns


class CallTrace:
    """One call's tracing state: the caller's context, and its requests' traces not ended."""

    __slots__ = ("live", "method", "parent", "start_ns", "trace")

    def __init__(self, method: str, parent: RemoteParent | None, stream: bool) -> None:
        self.method = method
        self.parent = parent
        #: A unary call's request starts with the call; a streamed one when it is decoded.
        self.start_ns = 0 if stream else _now()
        #: A unary call's request trace, once sampled.
        self.trace: RequestTrace | None = None
        #: A stream's sampled requests not answered yet (ended CANCELLED with the stream).
        self.live: set[RequestTrace] | None = set() if stream else None


class BatchRecord(NamedTuple):
    """The batch a traced request ran in (shared by the batch's traced requests)."""

    start_ns: int
    end_ns: int
    #: Rows, and requests, in the batch.
    rows: int
    requests: int
    executions: tuple[Execution, ...]


class RequestTrace:
    """One sampled request. Ended once (``finish``), then handed to the exporter."""

    __slots__ = ("batch", "call", "code", "data", "encode_end_ns", "encode_start_ns",
                 "end_ns", "enqueue_ns", "message", "model", "request_id", "sink", "start_ns",
                 "version")

    def __init__(self, call: CallTrace, sink: Callable[[RequestTrace], None],
                 start_ns: int) -> None:
        self.call = call
        self.sink = sink
        self.start_ns = start_ns
        self.end_ns = 0
        self.model = self.version = self.request_id = ""
        self.enqueue_ns = 0
        self.batch: BatchRecord | None = None
        self.encode_start_ns = self.encode_end_ns = 0
        self.code = grpc.StatusCode.OK
        self.message = ""
        #: The request's message until the trace ends: which message an error answer is for.
        self.data: bytes | None = None

    def named(self, request: InferRequest) -> None:
        self.model, self.version, self.request_id = (request.model_name, request.model_version,
                                                     request.id)

    def encoded(self, response: InferResponse, start_ns: int, end_ns: int) -> None:
        """Its answer was written: the version that served it is known now."""
        self.model, self.version = response.model_name, response.model_version
        self.encode_start_ns, self.encode_end_ns = start_ns, end_ns

    def finish(self, code: grpc.StatusCode, message: str = "") -> None:
        """End the request's span with its status; later calls do nothing."""
        if self.end_ns:
            return
        self.end_ns = _now()
        self.code, self.message = code, message
        self.data = None
        live = self.call.live
        if live is not None:
            live.discard(self)
        self.sink(self)

    @property
    def span_count(self) -> int:
        """The spans this trace becomes (spans.py): the request, and the queue, the batch and
        one compute per backend call, and the encoding, where they happened."""
        count = 1 + (self.encode_end_ns > 0)
        if self.batch is not None:
            count += 2 + len(self.batch.executions)
        return count


_CALL: ContextVar[CallTrace | None] = ContextVar("peregrine_trace_call", default=None)
_REQUEST: ContextVar[RequestTrace | None] = ContextVar("peregrine_trace_request", default=None)


def current_request() -> RequestTrace | None:
    """The trace of the request being answered in this context (None: not sampled)."""
    return _REQUEST.get()


def forget_request_unless(data: bytes) -> None:
    """A request (message ``data``) is answered before it was decoded, or without its
    decoded form: the trace in this context is its own only if its decoding began with
    ``data``. Otherwise it is a stream's previous request's (the reader's context keeps it
    until the next decoding), which this answer must not end."""
    trace = _REQUEST.get()
    if trace is not None and trace.data is not data:
        _REQUEST.set(None)


class Tracer:
    """Samples requests (the caller's sampled flag, else the rate) and fills their records;
    ``sink`` takes each ended trace (the exporter's queue)."""

    def __init__(self, settings: TraceSettings, sink: Callable[[RequestTrace], None]) -> None:
        self.settings = settings
        self._sink = sink

    def _sampled(self, parent: RemoteParent | None) -> bool:
        if parent is not None and parent.sampled:
            return self.settings.timestamps
        return self.settings.by_rate()

    def enter_unary(self, metadata: Iterable[tuple[str, str | bytes]] | None,
                    method: str) -> RequestTrace | None:
        """A unary call begins in this task: its one request is sampled now (so a refusal
        before decoding is traced too); None when it is not."""
        parent = remote_parent(metadata)
        if not self._sampled(parent):
            _CALL.set(None)
            return None
        call = CallTrace(method, parent, stream=False)
        call.trace = RequestTrace(call, self._sink, call.start_ns)
        _CALL.set(call)
        return call.trace

    def enter_stream(self, metadata: Iterable[tuple[str, str | bytes]] | None,
                     method: str) -> CallTrace:
        """A stream begins in this task: its caller's context is read once; its requests
        are sampled one by one as they are decoded."""
        call = CallTrace(method, remote_parent(metadata), stream=True)
        _CALL.set(call)
        return call

    def begin_request(self) -> RequestTrace | None:
        """A request is about to be decoded in this context: traced or not, from now on."""
        call = _CALL.get()
        trace = None
        if call is not None:
            live = call.live
            if live is None:
                trace = call.trace  # a unary call's, sampled when it began
            elif self._sampled(call.parent):
                trace = RequestTrace(call, self._sink, _now())
                live.add(trace)
        _REQUEST.set(trace)
        return trace

    def batch_done(self, entries: Sequence[QueuedRequest], start_ns: int, end_ns: int,
                   executions: Sequence[Execution]) -> None:
        """A batch answered ``entries`` (once per batch, on the loop): its traced requests
        get their queue time and the batch."""
        record: BatchRecord | None = None
        for entry in entries:
            trace = getattr(entry.request, "trace", None)
            if trace is None or trace.end_ns:
                continue  # not traced, or ended already (its caller went away): exported as is
            if record is None:
                record = BatchRecord(start_ns, end_ns, sum(e.rows for e in entries),
                                     len(entries), tuple(executions))
            trace.enqueue_ns = entry.enqueue_ns
            trace.batch = record
