"""``peregrine drift status``: the live window reports of a running server (PeregrineAdmin)."""

from __future__ import annotations

import argparse
import math
import sys

import grpc

from server._pb import admin_pb2 as admin
from server._pb import admin_pb2_grpc as admin_grpc
from server.cli.connection import add_connection_arguments, client_security


def add_status_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    status = sub.add_parser(
        "status", help="the server's latest drift windows, features worst first",
        description="Ask a running server (PeregrineAdmin.GetDrift) for its latest sliding "
        "and fixed window reports.",
    )
    add_connection_arguments(status)
    status.add_argument("--model", default="", help="only this model")
    status.add_argument("--version", default="", help="only this version")
    status.add_argument("--top", type=int, default=10, help="features shown per report")
    status.add_argument("--timeout", type=float, default=10.0)


def _number(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.4g}"


def run_status(args: argparse.Namespace) -> int:
    security = client_security(args, "peregrine drift status")
    with security.channel(args.url) as channel:
        stub = admin_grpc.PeregrineAdminStub(channel)
        try:
            reply = stub.GetDrift(admin.DriftRequest(model=args.model, version=args.version),
                                  timeout=args.timeout, metadata=security.metadata)
        except grpc.RpcError as exc:
            print(f"peregrine drift status: {exc.code().name}: {exc.details()}",
                  file=sys.stderr)
            return 1
    if not reply.reports:
        print("no drift window has been evaluated yet")
        return 0
    for report in reply.reports:
        print(f"{report.model} v{report.version} {report.window} window #{report.sequence}: "
              f"{report.rows} rows, score {report.score:.3f}, level {report.level}")
        print(f"  {'FEATURE':<28} {'LEVEL':<8} {'PSI':>8} {'P':>9} {'JS':>7} {'NAN':>6}")
        for feature in list(report.features)[: args.top]:
            name = feature.feature
            print(f"  {name:<28} {feature.level:<8} {_number(feature.psi):>8} "
                  f"{_number(feature.pvalue):>9} {_number(feature.js):>7} "
                  f"{_number(feature.missing_rate):>6}")
    return 0
