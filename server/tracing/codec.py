"""The wire codec with tracing: decoding samples a streamed request (a unary call's was
sampled when the call began) and marks the request traced or not; encoding is timed.

``app.py`` gives the inference servicer this in place of its codec only when tracing is on,
so the servicer itself knows nothing of tracing. A streamed request's trace ends here, when
its answer (or its error) is written; a unary one's ends in the frontend's wrapper, which
sees the call's status.
"""

from __future__ import annotations

import time

import grpc

from server.codec.shared_memory import SharedMemoryScope
from server.codec.wire import WireCodec
from server.tracing.trace import Tracer, current_request, forget_request_unless
from server.types import InferRequest, InferResponse

_now = time.perf_counter_ns


class TracedCodec:
    def __init__(self, inner: WireCodec, tracer: Tracer) -> None:
        self._inner = inner
        self._tracer = tracer

    def decode_request_bytes(self, data: bytes, deadline_ns: int | None,
                             shm: SharedMemoryScope | None) -> InferRequest:
        # Sampled before decoding, so a request that fails to decode is traced too.
        trace = self._tracer.begin_request()
        if trace is not None:
            trace.data = data
        request = self._inner.decode_request_bytes(data, deadline_ns, shm)
        request.trace = trace
        if trace is not None:
            trace.named(request)
        return request

    def encode_response_bytes(self, response: InferResponse, shm: SharedMemoryScope | None,
                              stream: bool) -> bytes:
        trace = current_request()
        if trace is None:
            return self._inner.encode_response_bytes(response, shm, stream)
        start = _now()
        encoded = self._inner.encode_response_bytes(response, shm, stream)
        trace.encoded(response, start, _now())
        if stream:
            trace.finish(grpc.StatusCode.OK)
        return encoded

    def encode_stream_error_bytes(self, model_name: str, model_version: str, request_id: str,
                                  message: str) -> bytes:
        trace = current_request()
        if trace is not None:
            if not trace.model:
                trace.model, trace.version, trace.request_id = (model_name, model_version,
                                                                request_id)
            trace.finish(*stream_status(message))
        return self._inner.encode_stream_error_bytes(model_name, model_version, request_id,
                                                     message)

    def identify(self, data: bytes) -> tuple[str, str, str]:
        """The servicer names a request it answers with an error from its bytes (it failed
        before or while decoding, or was refused right after): its error answer follows in
        this context, and must end its own trace only."""
        forget_request_unless(data)
        return self._inner.identify(data)


def stream_status(message: str) -> tuple[grpc.StatusCode, str]:
    """A stream's error answer as the servicer writes it, ``[CODE] text``, back to its code
    and text (UNKNOWN for any other form)."""
    name, close, text = message.partition("] ")
    if message.startswith("[") and close:
        code = grpc.StatusCode.__members__.get(name[1:])
        if code is not None:
            return code, text
    return grpc.StatusCode.UNKNOWN, message
