"""Peer servers from PyPI under the same load: Seldon MLServer (adaptive batching on and
off) and KServe's Python model server, each installed into a virtualenv of its own under
bench/ on first use (git-ignored).

    python -m bench.compare.peers [--skip-mlserver] [--skip-kserve] [scenario options]
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from bench.compare.model_repo import ensure_examples
from bench.compare.scenario import (
    Scenario,
    add_scenario_arguments,
    drive_all,
    record_comparison,
    scenario_from,
    temp_folder,
    write_input_files,
)
from bench.loadgen.cli import exit_on_sigterm

MLSERVER_VARIANTS = (("mlserver-batching", "mlserver, adaptive batching on", True),
                     ("mlserver-no-batching", "mlserver, adaptive batching off", False))
KSERVE_KEY = "kserve"

NOTES = (
    "MLServer: custom runtime bench/compare/peer_servers/mlserver_runtime.py "
    "(mlserver.MLModel subclass, "
    "onnxruntime session run in predict), parallel_workers 0; adaptive batching on = the "
    "example config's max batch size and queue delay as max_batch_size / max_batch_time",
    "MLServer streams answer one request at a time (predict_stream loops over the stream; "
    "MLServer logs 'Adaptive Batching is ... not supported for inference streaming'), its "
    "ModelStreamInfer returns bare ModelInferResponse messages (not Triton's "
    "ModelStreamInferResponse) and stamps every answer with the stream's first request id; "
    "the generator reads them with --stream-format plain and matches answers in order",
    "KServe: bench/compare/peer_servers/kserve_model.py "
    "(kserve.Model subclass, onnxruntime in predict), "
    "rebound from all interfaces to 127.0.0.1, logging at warning; no server-side "
    "batching; ModelStreamInfer is not implemented (UNIMPLEMENTED), so no streaming figures",
)


def run(scenario: Scenario, command: str, mlserver: bool = True, kserve: bool = True) -> None:
    from bench.compare.peer_servers import kserve_peer, mlserver_peer

    examples = ensure_examples(scenario.models)
    versions: dict[str, str] = {}
    servers: dict[str, str] = {}
    with temp_folder("bench-peers-") as folder:
        inputs = write_input_files(examples, scenario.models, Path(folder))
        if mlserver:
            for key, label, batching in MLSERVER_VARIANTS:
                print(f"peers: {label}", file=sys.stderr)
                with mlserver_peer.MLServerProcess(examples, scenario.models, batching,
                                                   cpus=scenario.server_cpus) as server:
                    drive_all(server, key, label, scenario, inputs)
                servers[key] = label
            versions["mlserver"] = mlserver_peer.version()
        if kserve:
            print("peers: kserve", file=sys.stderr)
            with kserve_peer.KServeProcess(examples, scenario.models,
                                           cpus=scenario.server_cpus) as server:
                drive_all(server, KSERVE_KEY, "kserve", scenario, inputs,
                          rpcs=[r for r in scenario.rpcs if r == "unary"])
            servers[KSERVE_KEY] = "kserve (unary only)"
            versions["kserve"] = kserve_peer.version()
    record_comparison("peers", command, scenario, NOTES, versions, servers)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.compare.peers", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_scenario_arguments(parser)
    parser.add_argument("--skip-mlserver", action="store_true")
    parser.add_argument("--skip-kserve", action="store_true")
    args = parser.parse_args(argv)
    exit_on_sigterm()
    run(scenario_from(args),
        "python -m bench.compare.peers " + " ".join(argv if argv is not None else sys.argv[1:]),
        mlserver=not args.skip_mlserver, kserve=not args.skip_kserve)
    from bench.compare.results import write_results

    print(f"wrote {write_results()}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
