"""A minimal OTLP/gRPC trace collector for benchmarks: it accepts TraceService/Export calls,
counts them and their bytes without parsing them (so its own CPU stays small), and on SIGTERM
prints the counts as one JSON line.

    python -m bench.studies.otlp_sink --port 4317
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from collections.abc import Sequence
from concurrent import futures
from typing import Any

import grpc

SERVICE = "opentelemetry.proto.collector.trace.v1.TraceService"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    counts = {"exports": 0, "bytes": 0}
    lock = threading.Lock()

    def export(request: bytes, context: Any) -> bytes:
        with lock:
            counts["exports"] += 1
            counts["bytes"] += len(request)
        return b""  # an empty ExportTraceServiceResponse: all accepted

    # Raw bytes both ways: no deserializer, no serializer.
    sink = grpc.method_handlers_generic_handler(
        SERVICE, {"Export": grpc.unary_unary_rpc_method_handler(export)})
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2), handlers=(sink,))
    server.add_insecure_port(f"127.0.0.1:{args.port}")
    server.start()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    stop.wait()
    server.stop(grace=1).wait()
    print(json.dumps(counts), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
