"""Method handlers of a service, built from its descriptor, and their registration.

Built by hand rather than by the generated ``add_*Servicer_to_server`` so the guard can wrap
them and chosen RPCs can take raw bytes (no deserializer or serializer)."""

from __future__ import annotations

from types import ModuleType
from typing import Any

import grpc
from google.protobuf.descriptor import ServiceDescriptor


def method_handlers(servicer: Any, service: ServiceDescriptor, messages: ModuleType,
                    raw: frozenset[str] = frozenset()) -> dict[str, grpc.RpcMethodHandler]:
    """A handler per method of ``service``: the servicer's method of that name, protobuf
    messages from ``messages`` except for the ``raw`` methods. A method the servicer does not
    define answers UNIMPLEMENTED (the generated base class's)."""
    handlers: dict[str, grpc.RpcMethodHandler] = {}
    for method in service.methods:
        behaviour = getattr(servicer, method.name)
        decode = None if method.name in raw else getattr(
            messages, method.input_type.name).FromString
        encode = None if method.name in raw else getattr(
            messages, method.output_type.name).SerializeToString
        if method.client_streaming and method.server_streaming:
            make = grpc.stream_stream_rpc_method_handler
        elif method.client_streaming:
            make = grpc.stream_unary_rpc_method_handler
        elif method.server_streaming:
            make = grpc.unary_stream_rpc_method_handler
        else:
            make = grpc.unary_unary_rpc_method_handler
        handlers[method.name] = make(behaviour, request_deserializer=decode,
                                     response_serializer=encode)
    return handlers


def add_service(server: grpc.aio.Server, service: ServiceDescriptor,
                handlers: dict[str, grpc.RpcMethodHandler]) -> None:
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(service.full_name, handlers),))
    server.add_registered_method_handlers(service.full_name, handlers)
