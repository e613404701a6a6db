"""A stand-in gRPC server that records every call's method and metadata.

It answers every unary method with an empty message (protobuf's defaults) unless
:data:`ANSWERS` has a canned one, and ModelStreamInfer with one empty answer per request.
Clients' call metadata (a bearer token, an operator header) can be checked without the
server's authorization code. Optionally TLS, or mutual TLS.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health_pb2

from server._pb import grpc_service_pb2 as pb
from tests.certificates import Pki

INFERENCE = "/inference.GRPCInferenceService/"
STREAM_METHOD = INFERENCE + "ModelStreamInfer"

#: Answers that clients need to be other than the defaults.
ANSWERS = {
    "/grpc.health.v1.Health/Check": health_pb2.HealthCheckResponse(
        status=health_pb2.HealthCheckResponse.SERVING).SerializeToString(),
    INFERENCE + "ModelReady": pb.ModelReadyResponse(ready=True).SerializeToString(),
    INFERENCE + "ModelMetadata": pb.ModelMetadataResponse(
        name="m", inputs=[pb.ModelMetadataResponse.TensorMetadata(
            name="INPUT0", datatype="FP32", shape=[1, 4])]).SerializeToString(),
}


@dataclass(frozen=True)
class Call:
    method: str
    metadata: dict[str, str]


class _Handler(grpc.GenericRpcHandler):
    def __init__(self, calls: list[Call], lock: threading.Lock) -> None:
        self._calls = calls
        self._lock = lock

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        method: str = details.method
        with self._lock:  # once per call: for a stream, once per stream
            self._calls.append(Call(method, {k: v for k, v in details.invocation_metadata}))
        if method == STREAM_METHOD:
            def answer_each(requests: Iterator[bytes], _: Any) -> Iterator[bytes]:
                for _request in requests:
                    yield b""
            return grpc.stream_stream_rpc_method_handler(answer_each)
        answer = ANSWERS.get(method, b"")
        return grpc.unary_unary_rpc_method_handler(lambda _request, _context: answer)


class RecordingServer:
    """Started on a free loopback port; ``calls`` lists what arrived, in order."""

    def __init__(self, credentials: grpc.ServerCredentials | None = None) -> None:
        self.calls: list[Call] = []
        self._server = grpc.server(ThreadPoolExecutor(max_workers=8),
                                   handlers=[_Handler(self.calls, threading.Lock())])
        address = "127.0.0.1:0"
        self.port = (self._server.add_insecure_port(address) if credentials is None
                     else self._server.add_secure_port(address, credentials))
        self.url = f"127.0.0.1:{self.port}"

    def of(self, method: str) -> list[Call]:
        """The calls of one method (its last path part, e.g. 'ModelInfer')."""
        return [c for c in self.calls if c.method.rsplit("/", 1)[-1] == method]

    def __enter__(self) -> RecordingServer:
        self._server.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.stop(grace=None)


def mutual_tls_credentials(pki: Pki) -> grpc.ServerCredentials:
    """Server credentials of ``pki``'s server certificate that require a client certificate
    from its CA: a call that arrives came with one."""
    return grpc.ssl_server_credentials(
        [(pki.server_key.read_bytes(), pki.server_cert.read_bytes())],
        root_certificates=pki.ca.read_bytes(), require_client_auth=True)
