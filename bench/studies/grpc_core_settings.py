"""Can gRPC's own settings lower the floor? The bare grpc.aio servicer (the no-op floor every
comparison is held against) with each of gRPC core's experiments that could touch a server's
per-call cost switched on through ``GRPC_EXPERIMENTS``, against the default, alternated round
by round, a fresh server each.

The floor is where most of a small request's server CPU goes in every figure of issues 13 to
15 (bench/RESULTS.md, "Frontend overhead per request"): if a core setting made it cheaper, every
server built on grpc.aio would gain. Unary ModelInfer of one MLP row (64 FP32), 64 in flight,
the servicer on ``--server-cpus``, this process and its load process on ``--client-cpus``.

    python -m bench.studies.grpc_core_settings [--repeats 3] [--experiments a,b,...]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

from bench.compare.servers import NoopServer
from bench.loadgen.inputs import InputTensor
from bench.loadgen.wire import infer_request_bytes
from bench.results_md import RESULTS_DIR, section_header
from bench.studies.bar_chart import grouped_bars
from bench.studies.overload import closed_loop
from bench.studies.revisions import closing_lines
from bench.studies.study_run import publish, start_study, study_arguments

SECTION = "## gRPC core settings against the no-op floor"
RESULTS_JSON = RESULTS_DIR / "grpc_core_settings.json"
RESULTS_PNG = RESULTS_DIR / "grpc_core_settings.png"
MODEL = "mlp_classifier"
#: Experiments of grpc 1.85's core whose descriptions concern a server's calls, filters,
#: transport or polling (the names gRPC's core lists; an unknown one is logged and ignored).
EXPERIMENTS = ("fuse_filters", "ph2_server", "optimization_03", "optimization_04",
               "optimization_05", "optimization_06", "prioritize_finished_requests",
               "pollset_alternative", "tcp_frame_size_tuning")
DEFAULT = "default"


def request_bytes() -> bytes:
    row = np.random.default_rng(0).random((1, 64), dtype=np.float32)
    return infer_request_bytes(MODEL, "", [InputTensor("input", "FP32", (1, 64),
                                                       row.tobytes())])


def floor_cost(setting: str, cpus: str | None, payload: bytes,
               args: argparse.Namespace) -> dict[str, float]:
    """A fresh bare servicer with ``setting``: calls per second and server us per call."""
    env = {} if setting == DEFAULT else {"GRPC_EXPERIMENTS": setting}
    loop = argparse.Namespace(model=MODEL, concurrency=64, sustain_seconds=args.seconds)
    with NoopServer(cpus, extra_args=("--raw-infer",), env=env) as server:
        capacity = closed_loop(server.url, server.pid, payload, loop, refusals=False)
    return {"calls_per_s": capacity.rate, "server_us_per_call": capacity.server_us_per_call}


def markdown(document: dict[str, Any]) -> str:
    rows = document["settings"]
    base = rows[0]["median_us_per_call"]
    lines = [
        *section_header(SECTION, document),
        f"The bare grpc.aio servicer (`bench/compare/noop_server.py --raw-infer`) on CPU "
        f"{document['server_cpus']}, the load on CPU {document['client_cpus']}: unary "
        f"ModelInfer of one MLP row, 64 in flight, {document['seconds']} s per step, "
        f"{document['repeats']} rounds alternating the settings, a fresh server each; "
        "medians. A setting is `GRPC_EXPERIMENTS=<name>` in the servicer's environment.", "",
        "| setting | calls/s | server us per call | vs default | per round (us) |",
        "|---|---:|---:|---:|---|",
    ]
    for row in rows:
        lines.append(f"| {row['setting']} | {row['median_calls_per_s']:,.0f} | "
                     f"{row['median_us_per_call']:.0f} | "
                     f"{row['median_us_per_call'] / base:.2f}x | "
                     + ", ".join(f"{v:.0f}" for v in row["us_per_call"]) + " |")
    best = min(rows[1:], key=lambda r: r["median_us_per_call"])
    spread = [max(r["us_per_call"]) / min(r["us_per_call"]) for r in rows]
    lines += ["", f"Cheapest setting: {best['setting']}, "
              f"{best['median_us_per_call'] / base:.2f}x the default's CPU per call; the "
              f"rounds of one setting differ by up to {max(spread):.2f}x, so a difference "
              "under that is noise."]
    lines += closing_lines(document, RESULTS_PNG, RESULTS_JSON, "gRPC core settings")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = study_arguments(__doc__)
    parser.add_argument("--experiments", default=",".join(EXPERIMENTS),
                        help="comma-separated GRPC_EXPERIMENTS names, each tried alone")
    args = parser.parse_args(argv)
    study = start_study("bench.studies.grpc_core_settings", argv, args.server_cpus,
                        args.client_cpus)
    settings = [DEFAULT, *filter(None, args.experiments.split(","))]
    payload = request_bytes()
    runs: dict[str, list[dict[str, float]]] = {s: [] for s in settings}
    for round_ in range(args.repeats):
        for setting in settings:
            figures = floor_cost(setting, study.server_cpus, payload, args)
            runs[setting].append(figures)
            print(f"round {round_ + 1} {setting}: {figures}", file=sys.stderr, flush=True)
    rows = [{"setting": s, "us_per_call": [r["server_us_per_call"] for r in runs[s]],
             "calls_per_s": [r["calls_per_s"] for r in runs[s]],
             "median_us_per_call": statistics.median(r["server_us_per_call"] for r in runs[s]),
             "median_calls_per_s": statistics.median(r["calls_per_s"] for r in runs[s])}
            for s in settings]
    document = study.document("grpc_core_settings", args, settings=rows)
    publish(RESULTS_JSON, document, lambda: grouped_bars(
        RESULTS_PNG, settings, {"server us per call": [r["median_us_per_call"] for r in rows]},
        "server us per call (median)", "bare grpc.aio servicer, unary, 64 in flight",
        size=(12, 4.5)),
        None if args.no_results_md else markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
