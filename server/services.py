"""The gRPC services the server offers, by descriptor: one list for the single-process
server, the engine and the frontend processes (which import only this, not the server)."""

from __future__ import annotations

from google.protobuf.descriptor import ServiceDescriptor
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2

from server._pb import admin_pb2
from server._pb import grpc_service_pb2 as pb

INFERENCE_DESCRIPTOR = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
ADMIN_DESCRIPTOR = admin_pb2.DESCRIPTOR.services_by_name["PeregrineAdmin"]
HEALTH_DESCRIPTOR = health_pb2.DESCRIPTOR.services_by_name["Health"]
REFLECTION_DESCRIPTOR = reflection_pb2.DESCRIPTOR.services_by_name["ServerReflection"]
INFERENCE_SERVICE = INFERENCE_DESCRIPTOR.full_name
ADMIN_SERVICE = ADMIN_DESCRIPTOR.full_name


def served_services() -> tuple[ServiceDescriptor, ...]:
    """Every service a frontend forwards (the engine answers UNIMPLEMENTED for one it does
    not serve, such as reflection when it is off)."""
    return (INFERENCE_DESCRIPTOR, ADMIN_DESCRIPTOR, HEALTH_DESCRIPTOR, REFLECTION_DESCRIPTOR)
