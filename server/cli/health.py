"""``peregrine health``: ask a server's grpc.health.v1 service, for container health checks."""

from __future__ import annotations

import argparse
import sys
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from server.cli.connection import add_connection_arguments, client_security


def add_health_parser(commands: Any) -> None:
    health = commands.add_parser(
        "health", help="exit 0 when the server reports SERVING (grpc.health.v1)",
        description="Query the standard gRPC health service; exit 0 when SERVING, 1 otherwise. "
        "Meant for Docker HEALTHCHECK and scripts.",
    )
    add_connection_arguments(health)
    health.add_argument("--service", default="",
                        help="service to check (default: the whole server)")
    health.add_argument("--timeout", type=float, default=3.0, help="seconds to wait")


def run_health(args: argparse.Namespace) -> int:
    security = client_security(args, "peregrine health")
    with security.channel(args.url) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=args.service),
                               timeout=args.timeout, metadata=security.metadata)
        except grpc.RpcError as exc:
            print(f"unhealthy: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(status)
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1
