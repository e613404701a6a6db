"""The whole comparison in one command: ceiling and floor, ours, peers; then RESULTS.md.

    python -m bench.compare [--skip-peers] [scenario options]   # or: peregrine bench all

MLP and CNN, unary and streaming, closed loop at each concurrency of the scenario, every
server pinned to the server CPU and the generator to the other; about 15 minutes with the
defaults (plus a minute or two the first time, to install the peers' virtualenvs).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

from bench.compare import ceiling, ours, peers
from bench.compare.results import write_results
from bench.compare.scenario import add_scenario_arguments, scenario_from
from bench.loadgen.cli import exit_on_sigterm
from bench.loadgen.sweep import parse_concurrency


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.compare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_scenario_arguments(parser)
    parser.add_argument("--batch-sizes", default="1,8,32", help="for the in-process ceiling")
    parser.add_argument("--skip-peers", action="store_true", help="no MLServer, no KServe")
    parser.add_argument("--skip-kserve", action="store_true")
    args = parser.parse_args(argv)
    exit_on_sigterm()
    scenario = scenario_from(args)
    command = " ".join(["python -m bench.compare",
                        *(argv if argv is not None else sys.argv[1:])])
    started = time.monotonic()
    ceiling.run(scenario, parse_concurrency(args.batch_sizes), command)
    ours.run(scenario, command)
    if not args.skip_peers:
        peers.run(scenario, command, kserve=not args.skip_kserve)
    path = write_results()
    print(f"wrote {path} in {(time.monotonic() - started) / 60:.1f} min", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
