"""The HTTP/1.1 server of the REST surface: an asyncio protocol over httptools (llhttp, the
parser of Node.js and uvicorn), on the server's event loop.

Chosen for its cost per request (figures in docs/design.md, "HTTP/REST"): a request is
parsed by llhttp in C, handed to the gateway in one task, and answered in one write; nothing
else is done per request. llhttp does the part that must be right for hostile input (request
lines, headers, chunked bodies, request smuggling); this module does HTTP/1.1's framing
around it:

- Keep-alive and pipelining: a connection's requests are answered one at a time, in order;
  while one is being answered the connection is not read further (a pipelining client is held
  back by TCP), and while the client does not read its answers no next request starts.
- Bounds: at most ``max_connections`` connections (one more is answered 503 and closed), a
  request line and headers of at most 64 KiB (431), a body of at most ``max_body`` bytes (413,
  checked on Content-Length before the body is read and while a chunked body arrives), a
  request that is not complete within REQUEST_TIMEOUT_S of its first byte (408), and a
  keep-alive connection idle for KEEPALIVE_TIMEOUT_S (closed).
- ``Expect: 100-continue`` is answered once the headers are checked (curl sends it for bodies
  over 1 KiB and would otherwise wait a second).
- A client that closes its connection cancels its request (the call in the engine too).
- TLS through asyncio with the server's certificates, client certificates' names passed to
  the call as gRPC passes them (server/security/tls.py).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import http
import logging
import socket
import ssl
import time
import typing
from typing import Any

import httptools

from server.multiproc.frames import AuthContext
from server.rest.gateway import Call, Gateway, HttpRequest
from server.rest.routes import Reply, error_reply
from server.security import tls
from server.settings import ServerSettings

log = logging.getLogger(__name__)

#: Bytes of request line and headers a request may have.
MAX_HEAD_BYTES = 64 * 1024
#: Seconds a keep-alive connection may stay idle between requests.
KEEPALIVE_TIMEOUT_S = 75.0
#: Seconds a request may take to arrive whole, from its first byte.
REQUEST_TIMEOUT_S = 60.0
#: Seconds a connection refused while its request's body still arrives is read (and the
#: rest dropped) after the answer, before it is closed.
LINGER_S = 2.0
#: How often idle and slow connections are looked for.
SWEEP_INTERVAL_S = 1.0
_REASONS = {status.value: status.phrase for status in http.HTTPStatus}
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
#: A closed connection's parser, never fed: the connection lets go of its own (which holds it).
_CLOSED_PARSER = httptools.HttpRequestParser(object())


class _Refusal(Exception):
    """A request refused while it is read (too large, malformed): answered, then the
    connection closes."""

    def __init__(self, reply: Reply) -> None:
        super().__init__(reply.status)
        self.reply = reply


def peer_of(address: Any, family: int) -> str:
    """A socket address as gRPC writes a peer (``ipv4:127.0.0.1:5555``,
    ``ipv6:[::1]:5555``): the shared-memory gate and the audit log read that form."""
    if family == socket.AF_INET6 and isinstance(address, tuple):
        return f"ipv6:[{address[0]}]:{address[1]}"
    if family == socket.AF_INET and isinstance(address, tuple):
        return f"ipv4:{address[0]}:{address[1]}"
    return f"unix:{address}" if address else "unix:"


def certificate_names(ssl_object: ssl.SSLObject | None) -> AuthContext:
    """A verified client certificate's common name and subject alternative names, under the
    keys gRPC's auth context uses (empty without TLS or a certificate)."""
    if ssl_object is None:
        return {}
    auth: AuthContext = {"transport_security_type": [b"ssl"]}
    certificate: dict[str, Any] = dict(ssl_object.getpeercert() or {})
    if not certificate:
        return auth
    names = [str(value).encode() for rdn in certificate.get("subject", ())
             for key, value in rdn if key == "commonName"]
    if names:
        auth["x509_common_name"] = names
    alternative = [str(value).encode() for _kind, value in certificate.get("subjectAltName", ())]
    if alternative:
        auth["x509_subject_alternative_name"] = alternative
    return auth


class _Connection(asyncio.Protocol):
    """One client connection: parses its requests and answers them in order."""

    def __init__(self, server: HttpServer) -> None:
        self._server = server
        self._loop = server.loop
        self._transport: asyncio.Transport | None = None
        self._parser = httptools.HttpRequestParser(self)
        self._peer = ""
        self._auth: AuthContext = {}
        # The request being read.
        self._url = b""
        self._headers: list[tuple[str, str]] = []
        self._head_bytes = 0
        self._body: list[bytes] = []
        self._body_bytes = 0
        self._reading = False
        # Requests read and not answered (the first is being answered), in order.
        self._pending: collections.deque[tuple[HttpRequest | Reply, bool]] = \
            collections.deque()
        self._task: asyncio.Task[None] | None = None
        self._paused_reading = False
        self._paused_writing = False
        self._closing = False
        self._lingering = False
        #: When the connection is closed as idle or slow (loop time), if nothing happens.
        self.deadline = 0.0

    # -- asyncio.Protocol -----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but are ones.
        transport = typing.cast(asyncio.Transport, transport)
        self._transport = transport
        server = self._server
        if len(server.connections) >= server.max_connections:
            reply = error_reply(503, f"the server holds {server.max_connections} HTTP "
                                "connections, its limit; try again later")
            transport.write(_encode(reply, keep_alive=False))
            transport.close()
            self._closing = True
            return
        server.connections.add(self)
        sock = transport.get_extra_info("socket")
        self._peer = peer_of(transport.get_extra_info("peername"),
                             sock.family if sock is not None else socket.AF_INET)
        self._auth = certificate_names(transport.get_extra_info("ssl_object"))
        self.deadline = self._loop.time() + KEEPALIVE_TIMEOUT_S

    def connection_lost(self, exc: Exception | None) -> None:
        self._closing = True
        self._server.connections.discard(self)
        if self._task is not None:
            self._task.cancel()
        # The parser holds this protocol (its callbacks) and this protocol the parser: a
        # cycle only the garbage collector frees, with what the connection still holds.
        self._parser = _CLOSED_PARSER
        self._body = []
        self._pending.clear()

    def data_received(self, data: bytes) -> None:
        if self._closing:
            return  # refused: what the client still sends is dropped until it closes
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserCallbackError as exc:
            # What a callback raised, wrapped by httptools.
            refusal = exc.__context__
            if isinstance(refusal, _Refusal):
                self._refuse(refusal.reply)
            else:
                log.error("HTTP request not parsed", exc_info=refusal)
                self._refuse(error_reply(500, "internal error"))
        except httptools.HttpParserUpgrade:
            self._refuse(error_reply(400, "protocol upgrades are not supported"))
        except httptools.HttpParserError as exc:
            self._refuse(error_reply(400, f"malformed HTTP request: {exc}"))

    def pause_writing(self) -> None:
        self._paused_writing = True

    def resume_writing(self) -> None:
        self._paused_writing = False
        self._next()

    # -- httptools callbacks --------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._url = b""
        self._headers = []
        self._head_bytes = 0
        self._body = []
        self._body_bytes = 0
        self._reading = True
        self.deadline = self._loop.time() + REQUEST_TIMEOUT_S

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._count_head(len(url))

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count_head(len(name) + len(value))
        self._headers.append((name.decode("latin-1").lower(), value.decode("latin-1")))

    def _count_head(self, size: int) -> None:
        self._head_bytes += size
        if self._head_bytes > MAX_HEAD_BYTES:
            raise _Refusal(error_reply(431, f"the request line and headers are over "
                                       f"{MAX_HEAD_BYTES} bytes"))

    def on_headers_complete(self) -> None:
        limit = self._server.max_body
        expect = False
        for name, value in self._headers:
            if name == "content-length" and value.strip().isdigit() and int(value) > limit:
                raise _Refusal(_too_large(int(value), limit))
            if name == "expect" and value.strip().lower() == "100-continue":
                expect = True
        if expect and self._transport is not None and not self._pending:
            self._transport.write(_CONTINUE)

    def on_body(self, body: bytes) -> None:
        self._body_bytes += len(body)
        if self._body_bytes > self._server.max_body:
            raise _Refusal(_too_large(self._body_bytes, self._server.max_body))
        self._body.append(body)

    def on_message_complete(self) -> None:
        self._reading = False
        target = self._url
        if not target.startswith(b"/"):
            try:
                target = httptools.parse_url(target).path or b"/"
            except httptools.HttpParserInvalidURLError:
                target = b"?"
        path = target.partition(b"?")[0].decode("latin-1")
        body = self._body[0] if len(self._body) == 1 else b"".join(self._body)
        self._body = []  # the request holds it now, and lets it go when answered
        request = HttpRequest(self._parser.get_method().decode("latin-1"), path,
                              self._headers, body, self._peer, self._auth)
        self._queue(request, self._parser.should_keep_alive())

    # -- answering --------------------------------------------------------------------------

    def _queue(self, item: HttpRequest | Reply, keep_alive: bool) -> None:
        self._pending.append((item, keep_alive))
        if len(self._pending) > 1 and not self._paused_reading and self._transport is not None:
            self._transport.pause_reading()
            self._paused_reading = True
        self._next()

    def _refuse(self, reply: Reply) -> None:
        """Answer ``reply`` after the requests already read, then close."""
        self._queue(reply, False)
        self._closing = True

    def _next(self) -> None:
        """Start answering the next request, if none is being answered and the client reads
        its answers."""
        if self._task is not None or not self._pending or self._paused_writing:
            return
        item, keep_alive = self._pending[0]
        if isinstance(item, Reply):
            self._pending.popleft()
            self._send(item, keep_alive)
            return
        self._task = self._loop.create_task(self._answer(item, keep_alive))

    async def _answer(self, request: HttpRequest, keep_alive: bool) -> None:
        try:
            reply = await self._server.gateway.handle(request)
        except asyncio.CancelledError:
            return
        except Exception:  # the gateway answers every failure; this is a last resort
            log.exception("REST request failed", extra={"path": request.path})
            reply, keep_alive = error_reply(500, "internal error"), False
        self._task = None
        self._pending.popleft()
        self._send(reply, keep_alive)

    def _send(self, reply: Reply, keep_alive: bool) -> None:
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        keep_alive = keep_alive and not self._server.stopping and not (
            self._closing and not self._pending)
        transport.write(_encode(reply, keep_alive))
        if not keep_alive:
            self._closing = True
            if self._reading and transport.can_write_eof():
                # Refused while its body still arrives: end our side and drop the rest of
                # it for a moment, so that the client, still sending, reads the answer
                # instead of a reset; the sweep closes the connection after LINGER_S.
                transport.write_eof()
                self.deadline = self._loop.time() + LINGER_S
                self._lingering = True
            else:
                transport.close()
            return
        if self._paused_reading and not self._pending:
            self._paused_reading = False
            transport.resume_reading()
        if not self._reading:
            self.deadline = self._loop.time() + KEEPALIVE_TIMEOUT_S
        self._next()

    # -- the server's sweeps and stop -------------------------------------------------------

    @property
    def busy(self) -> bool:
        return self._task is not None or bool(self._pending)

    def expire(self) -> None:
        """Past its deadline: a slow request is answered 408, an idle connection closed."""
        if self._transport is None or (self.busy and not self._lingering):
            return
        if self._reading and not self._lingering:
            self._closing = True
            self._transport.write(_encode(error_reply(
                408, f"the request did not arrive within {REQUEST_TIMEOUT_S:g} s"), False))
        self._transport.close()

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()


def _too_large(size: int, limit: int) -> Reply:
    return error_reply(413, f"the request body of {size} bytes is over the limit of {limit} "
                       "bytes (--grpc-max-message-bytes)")


def _encode(reply: Reply, keep_alive: bool) -> bytes:
    head = [f"HTTP/1.1 {reply.status} {_REASONS.get(reply.status, '')}\r\n"
            f"content-length: {len(reply.body)}\r\n"]
    head += [f"{name}: {value}\r\n" for name, value in reply.headers]
    if not keep_alive:
        head.append("connection: close\r\n")
    head.append("\r\n")
    return "".join(head).encode("latin-1") + reply.body


class HttpServer:
    """The REST listener: ``gateway`` answers each request."""

    def __init__(self, gateway: Gateway, max_body: int, max_connections: int,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        self.gateway = gateway
        self.max_body = max_body
        self.max_connections = max_connections
        self._ssl = ssl_context
        self.connections: set[_Connection] = set()
        self.stopping = False
        self.loop = asyncio.get_running_loop()
        self._server: asyncio.Server | None = None
        self._sweeper: asyncio.Task[None] | None = None

    async def start(self, host: str, port: int, reuse_port: bool) -> int:
        """Listen on ``host:port`` (0: a free port; ``reuse_port``: shared with the other
        frontend processes); returns the port."""
        listening = _listening_socket(host, port, reuse_port)
        self._server = await self.loop.create_server(
            lambda: _Connection(self), sock=listening, ssl=self._ssl, backlog=1024)
        self._sweeper = self.loop.create_task(self._sweep())
        return int(listening.getsockname()[1])

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_INTERVAL_S)
            now = self.loop.time()
            for connection in [c for c in self.connections if c.deadline < now]:
                connection.expire()

    async def stop(self, grace: float) -> None:
        """Stop listening, close idle connections, let requests being answered finish within
        ``grace`` seconds, then close the rest."""
        self.stopping = True
        if self._server is not None:
            self._server.close()
        if self._sweeper is not None:
            self._sweeper.cancel()
            await asyncio.gather(self._sweeper, return_exceptions=True)
        deadline = time.monotonic() + grace
        while True:
            for connection in [c for c in self.connections if not c.busy]:
                connection.close()
            if not self.connections or time.monotonic() >= deadline:
                break
            await asyncio.sleep(0.05)
        for connection in list(self.connections):
            connection.close()
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 1.0)


def _listening_socket(host: str, port: int, reuse_port: bool) -> socket.socket:
    family, kind, proto, _, address = socket.getaddrinfo(
        host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    listening = socket.socket(family, kind, proto)
    try:
        listening.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            listening.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        listening.bind(address)
        listening.setblocking(False)
    except OSError as exc:
        listening.close()
        raise OSError(f"cannot bind HTTP to {host}:{port}: {exc}") from exc
    return listening


async def start_http(settings: ServerSettings, call: Call, reuse_port: bool
                     ) -> tuple[HttpServer, int]:
    """The REST server the settings ask for (--allow-http), making its calls with ``call``;
    returns it and its port. ``reuse_port``: the port is shared with the other frontend
    processes."""
    server = HttpServer(Gateway(call, settings.grpc_max_message_bytes),
                        settings.grpc_max_message_bytes, settings.http_max_connections,
                        tls.https_context(settings))
    return server, await server.start(settings.http_host, settings.http_port, reuse_port)
