"""Peregrine with dynamic batching on (the example configs' settings) and off.

Both serve a copy of the example repository (latest version of each model) with the
comparison's ONNX Runtime settings; 'off' has the ``dynamic_batching`` block removed.

    python -m bench.compare.ours [scenario options]
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from bench.compare.model_repo import comparison_repository, ensure_examples
from bench.compare.scenario import (
    Scenario,
    add_scenario_arguments,
    drive_all,
    record_comparison,
    scenario_from,
    temp_folder,
    write_input_files,
)
from bench.compare.servers import PeregrineProcess
from bench.loadgen.cli import exit_on_sigterm
from bench.loadgen.environment import package_versions

VARIANTS = (("peregrine-batching", "peregrine, batching on", True),
            ("peregrine-no-batching", "peregrine, batching off", False))


def run(scenario: Scenario, command: str) -> None:
    examples = ensure_examples(scenario.models)
    with temp_folder("bench-ours-") as folder:
        inputs = write_input_files(examples, scenario.models, Path(folder))
        for key, label, batching in VARIANTS:
            print(f"ours: {label}", file=sys.stderr)
            repository = comparison_repository(examples, Path(folder) / key, scenario.models,
                                               batching)
            with PeregrineProcess(repository, cpus=scenario.server_cpus, name=key) as server:
                drive_all(server, key, label, scenario, inputs)
    record_comparison(
        "ours", command, scenario,
        notes=["batching on: the example configs' dynamic_batching (mlp_classifier: "
               "preferred 16, 32, max delay 500 us, max batch 64; cnn: preferred 8, 16, "
               "max delay 200 us, max batch 32)",
               "batching off: the dynamic_batching block removed"],
        versions=package_versions(("peregrine", "grpcio", "protobuf", "onnxruntime", "uvloop")),
        servers={key: label for key, label, _ in VARIANTS},
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.compare.ours", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_scenario_arguments(parser)
    args = parser.parse_args(argv)
    exit_on_sigterm()
    run(scenario_from(args),
        "python -m bench.compare.ours " + " ".join(argv if argv is not None else sys.argv[1:]))
    from bench.compare.results import write_results

    print(f"wrote {write_results()}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
