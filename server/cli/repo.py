"""``peregrine repo index|load|unload``: model control against a running server over gRPC."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import grpc

from server._pb import grpc_service_pb2 as pb
from server._pb import grpc_service_pb2_grpc as pb_grpc
from server.cli.connection import Metadata, add_connection_arguments, client_security


def add_repo_parser(commands: Any) -> None:
    repo = commands.add_parser(
        "repo", help="list, load and unload models of a running server",
        description="Model control over gRPC (RepositoryIndex, RepositoryModelLoad/Unload). "
        "Loading and unloading need a server started with --model-control-mode explicit.",
    )
    add_connection_arguments(repo)
    repo.add_argument("--timeout", type=float, default=120.0, help="seconds to wait per call")
    actions = repo.add_subparsers(dest="repo_command", required=True)
    index = actions.add_parser("index", help="models, versions, states and reasons")
    index.add_argument("--verbose", action="store_true",
                       help="also print each ready version's model card and metadata")
    load = actions.add_parser("load", help="load or reload a model (zero-downtime swap)")
    load.add_argument("model")
    load.add_argument("--config", help="a ModelConfig as JSON overriding config.pbtxt")
    unload = actions.add_parser("unload", help="drain and unload every version of a model")
    unload.add_argument("model")


def _print_index(stub: pb_grpc.GRPCInferenceServiceStub, timeout: float, verbose: bool,
                 metadata: Metadata) -> None:
    response = stub.RepositoryIndex(pb.RepositoryIndexRequest(), timeout=timeout,
                                    metadata=metadata)
    rows = [(m.name, m.version or "-", m.state, m.reason) for m in response.models]
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in
              enumerate(("MODEL", "VERSION", "STATE"))]
    print(f"{'MODEL':<{widths[0]}}  {'VERSION':<{widths[1]}}  {'STATE':<{widths[2]}}  REASON")
    for name, version, state, reason in rows:
        print(f"{name:<{widths[0]}}  {version:<{widths[1]}}  {state:<{widths[2]}}  {reason}")
        if verbose and state == "READY":
            described = stub.ModelMetadata(
                pb.ModelMetadataRequest(name=name, version=version), timeout=timeout,
                metadata=metadata,
            )
            for tensor in described.inputs:
                print(f"    input  {tensor.name} {tensor.datatype} {list(tensor.shape)}")
            for tensor in described.outputs:
                print(f"    output {tensor.name} {tensor.datatype} {list(tensor.shape)}")
            for key, value in sorted(described.properties.items()):
                print(f"    {key} = {value}")


def run_repo(args: argparse.Namespace) -> int:
    security = client_security(args, f"peregrine repo {args.repo_command}")
    metadata = security.metadata
    with security.channel(args.url) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        try:
            if args.repo_command == "index":
                _print_index(stub, args.timeout, args.verbose, metadata)
            elif args.repo_command == "load":
                request = pb.RepositoryModelLoadRequest(model_name=args.model)
                if args.config:
                    try:
                        json.loads(args.config)
                    except json.JSONDecodeError as exc:
                        print(f"peregrine repo load: --config is not JSON: {exc}",
                              file=sys.stderr)
                        return 2
                    request.parameters["config"].string_param = args.config
                stub.RepositoryModelLoad(request, timeout=args.timeout, metadata=metadata)
                print(f"loaded {args.model}")
            else:
                stub.RepositoryModelUnload(
                    pb.RepositoryModelUnloadRequest(model_name=args.model), timeout=args.timeout,
                    metadata=metadata,
                )
                print(f"unloaded {args.model}")
        except grpc.RpcError as exc:
            print(f"peregrine repo {args.repo_command}: {exc.code().name}: {exc.details()}",
                  file=sys.stderr)
            return 1
    return 0
