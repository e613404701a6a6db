"""One REST request, end to end, whatever HTTP server carries it: the body decompressed, the
request translated to its gRPC call, the call made (on the server's own handlers, or
forwarded to the engine), and the reply or the call's status translated back.

The call carries what a gRPC call would: the HTTP headers as its metadata (``authorization``,
Triton's restricted-protocol headers, ``traceparent``, the headers
``--grpc-header-forward-pattern`` forwards), the peer's address in gRPC's form, and a verified
client certificate's names. So the guard, the bounds, the planes and the audit log see a REST
request exactly as they see its gRPC twin, and answer it with the same status and message.
"""

from __future__ import annotations

import logging
import math
import zlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import grpc

from server.errors import correlation_id
from server.multiproc.frames import AuthContext, CallOpening, CallStatus, Metadata
from server.rest.messages import HTTP_STATUS, BadRequest
from server.rest.routes import Reply, error_reply, exchange

log = logging.getLogger(__name__)

#: A unary gRPC call: its reply message (None when it failed) and its status.
Call = Callable[[CallOpening], Awaitable[tuple[bytes | None, CallStatus]]]
#: Headers that frame the HTTP message itself: never passed on as call metadata.
FRAMING = frozenset({
    "host", "connection", "keep-alive", "content-length", "content-type", "content-encoding",
    "transfer-encoding", "te", "trailer", "upgrade", "expect", "accept-encoding",
    "inference-header-content-length", "proxy-connection"})
#: gRPC's trailing metadata key of the delay before a refused call may be retried, in ms.
RETRY_PUSHBACK = "grpc-retry-pushback-ms"
ENCODINGS = ("gzip", "deflate")


@dataclass(slots=True)
class HttpRequest:
    """A request as the HTTP server read it."""

    method: str
    #: The path, percent-encoded, without the query.
    path: str
    #: Header names in lower case, in the order received.
    headers: list[tuple[str, str]]
    body: bytes
    #: The client's address as gRPC writes it (``ipv4:127.0.0.1:5555``).
    peer: str
    #: A verified client certificate's names, as gRPC's auth context gives them.
    auth: AuthContext = field(default_factory=dict)


class Gateway:
    """REST requests -> gRPC calls -> REST answers. ``max_body``: the largest body, after
    decompression, a request may have (the server's message limit)."""

    def __init__(self, call: Call, max_body: int) -> None:
        self._call = call
        self._max_body = max_body

    async def handle(self, request: HttpRequest) -> Reply:
        headers = dict(request.headers)
        try:
            body = self._decompressed(request.body, headers.get("content-encoding"))
            call = exchange(request.method, request.path, headers, body)
            if len(call.message) > self._max_body:
                # JSON data can translate to more bytes than it took (BYTES, small numbers as
                # FP64): the message is held to the limit a gRPC message is.
                raise BadRequest(f"the request translates to a message of {len(call.message)} "
                                 f"bytes, over the limit of {self._max_body} bytes "
                                 "(--grpc-max-message-bytes)", 413)
        except BadRequest as exc:
            reply = error_reply(exc.status, exc.message)
            if exc.status == 415:
                reply.headers.append(("accept-encoding", ", ".join(ENCODINGS)))
            return reply
        except Exception as exc:  # a translation bug must not take the connection down
            return _internal(exc, request)
        opening = CallOpening(call.method, None, request.peer, _metadata(request.headers),
                              request.auth, call.message)
        message, status = await self._call(opening)
        if message is None or status.code is not grpc.StatusCode.OK:
            return status_reply(status)
        try:
            reply = call.answer(message)
        except Exception as exc:
            return _internal(exc, request)
        if call.compressible and reply.body:
            _compress(reply, headers.get("accept-encoding"))
        return reply

    def _decompressed(self, body: bytes, encoding: str | None) -> bytes:
        """The body as sent (identity), or inflated within the body limit."""
        if encoding is None or encoding.strip().lower() in ("", "identity"):
            return body
        if encoding.strip().lower() not in ENCODINGS:
            raise BadRequest(f"Unsupported compression type '{encoding}'", 415)
        inflater = zlib.decompressobj(zlib.MAX_WBITS | 32)  # a gzip or a zlib header
        try:
            inflated = inflater.decompress(body, self._max_body + 1)
        except zlib.error as exc:
            raise BadRequest(f"the request body is not valid {encoding} data: {exc}") from None
        if len(inflated) > self._max_body:
            raise BadRequest(f"the request body inflates past the limit of {self._max_body} "
                             "bytes", 413)
        if not inflater.eof:
            raise BadRequest(f"the request body is truncated {encoding} data")
        return inflated


def _metadata(headers: list[tuple[str, str]]) -> Metadata:
    return tuple((name, value) for name, value in headers
                 if name not in FRAMING and not name.startswith("grpc-"))


def status_reply(status: CallStatus) -> Reply:
    """A failed call's status as Triton writes an HTTP error: ``{"error": message}``."""
    reply = error_reply(HTTP_STATUS.get(status.code, 500), status.details)
    if status.code is grpc.StatusCode.UNAUTHENTICATED:
        reply.headers.append(("www-authenticate", "Bearer"))
    for key, value in status.trailing:
        if key == RETRY_PUSHBACK and isinstance(value, str) and value.isdigit():
            reply.headers.append(("retry-after", str(max(1, math.ceil(int(value) / 1000)))))
    return reply


def _internal(exc: Exception, request: HttpRequest) -> Reply:
    correlation = correlation_id()
    log.error("REST request failed", extra={"path": request.path, "method": request.method,
                                            "correlation_id": correlation}, exc_info=exc)
    return error_reply(500, f"internal error (correlation id {correlation})")


def _compress(reply: Reply, accepted: str | None) -> None:
    """Compress ``reply`` with the encoding the client prefers among gzip and deflate (by its
    q-values), if it accepts one."""
    chosen, weight = "", 0.0
    for item in (accepted or "").split(","):
        name, _, rest = item.strip().partition(";")
        quality = 1.0
        if rest.strip().startswith("q="):
            try:
                quality = float(rest.strip()[2:])
            except ValueError:
                continue
        if name.strip().lower() in ENCODINGS and quality > weight:
            chosen, weight = name.strip().lower(), quality
    if not chosen:
        return
    compressor = zlib.compressobj(wbits=zlib.MAX_WBITS | (16 if chosen == "gzip" else 0))
    reply.body = compressor.compress(reply.body) + compressor.flush()
    reply.headers.append(("content-encoding", chosen))
