"""What a refusal costs the server, against an earlier revision: the overload study's refusal
capacity (a closed loop of requests refused at once from their parsed shape, past
--max-tensor-elements, 64 in flight) for this tree and for ``--baseline REV``, alternated
round by round on the same machine, each round with a fresh server of each.

The baseline runs from a temporary git worktree of REV with this tree's built native
extension and generated protobuf modules, so REV must not differ from this tree in csrc/,
proto/ or setup.py (the study refuses otherwise). Server on ``--server-cpus`` with one ONNX
Runtime thread (the example ``mlp_classifier``), this process and its load process on
``--client-cpus``.

    python -m bench.studies.refusal_cost --baseline REV [--repeats 4]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.compare.model_repo import comparison_repository, ensure_examples
from bench.loadgen.environment import REPO_ROOT
from bench.results_md import RESULTS_DIR, section_header
from bench.studies.bar_chart import grouped_bars
from bench.studies.overload import closed_loop, payloads
from bench.studies.revisions import (
    baseline_tree,
    closing_lines,
    git,
    revision_arguments,
    server_at,
)
from bench.studies.study_run import publish, start_study

SECTION = "## Refusal cost against an earlier revision"
RESULTS_JSON = RESULTS_DIR / "refusal_cost.json"
RESULTS_PNG = RESULTS_DIR / "refusal_cost.png"
MODEL = "mlp_classifier"
def refusal_capacity(root: Path, repo: Path, cpus: str | None,
                     args: argparse.Namespace) -> dict[str, float]:
    """A fresh server from the tree at ``root``: refusals per second and server us each."""
    loop = argparse.Namespace(model=MODEL, concurrency=64, sustain_seconds=args.seconds)
    with server_at(root, repo, cpus) as server:
        refused = payloads(server.url, MODEL)[1]
        capacity = closed_loop(server.url, server.pid, refused, loop, refusals=True)
    return {"refusals_per_s": capacity.rate, "server_us_per_refusal":
            capacity.server_us_per_call}


def markdown(document: dict[str, Any]) -> str:
    rows = document["revisions"]
    lines = [
        *section_header(SECTION, document),
        f"The server on CPU {document['server_cpus']} (example `{MODEL}`, one ONNX Runtime "
        f"thread), the load on CPU {document['client_cpus']}: 64 requests in flight, each "
        "refused at once from its parsed shape (past --max-tensor-elements), "
        f"{document['seconds']} s per step, {document['repeats']} rounds alternating the "
        "revisions, a fresh server each.", "",
        "| revision | refusals/s (median) | server us per refusal (median) | per round |",
        "|---|---:|---:|---|",
    ]
    for row in rows:
        lines.append(f"| {row['label']} `{row['revision'][:10]}` | "
                     f"{row['median_refusals_per_s']:,.0f} | "
                     f"{row['median_us_per_refusal']:.0f} | "
                     + ", ".join(f"{v:.0f}" for v in row["us_per_refusal"]) + " |")
    base, this = rows
    lines += ["", f"This tree against the baseline: "
              f"{this['median_us_per_refusal'] / base['median_us_per_refusal']:.2f}x the CPU "
              f"per refusal, {this['median_refusals_per_s'] / base['median_refusals_per_s']:.2f}"
              "x the refusals per second."]
    lines += closing_lines(document, RESULTS_PNG, RESULTS_JSON, "refusal cost")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = revision_arguments(__doc__).parse_args(argv)
    study = start_study("bench.studies.refusal_cost", argv, args.server_cpus,
                        args.client_cpus)
    baseline = git("rev-parse", args.baseline)
    runs: dict[str, list[dict[str, float]]] = {"baseline": [], "this tree": []}
    with tempfile.TemporaryDirectory(prefix="refusal-cost-") as tmp, \
            baseline_tree(baseline) as old_tree:
        repo = comparison_repository(ensure_examples([MODEL]), Path(tmp) / "models", [MODEL],
                                     batching=True)
        for round_ in range(args.repeats):
            for label, root in (("baseline", old_tree), ("this tree", REPO_ROOT)):
                figures = refusal_capacity(root, repo, study.server_cpus, args)
                runs[label].append(figures)
                print(f"round {round_ + 1} {label}: {figures}", file=sys.stderr, flush=True)
    revisions: list[dict[str, Any]] = []
    for label, revision in (("baseline", baseline), ("this tree", git("rev-parse", "HEAD"))):
        costs = [r["server_us_per_refusal"] for r in runs[label]]
        rates = [r["refusals_per_s"] for r in runs[label]]
        revisions.append({"label": label, "revision": revision, "us_per_refusal": costs,
                          "refusals_per_s": rates,
                          "median_us_per_refusal": statistics.median(costs),
                          "median_refusals_per_s": statistics.median(rates)})
    document = study.document("refusal_cost", args, revisions=revisions)
    publish(RESULTS_JSON, document, lambda: grouped_bars(
        RESULTS_PNG, [f"round {i + 1}" for i in range(args.repeats)],
        {row["label"]: row["us_per_refusal"] for row in revisions},
        "server us per refusal", f"{MODEL}, refused at once, 64 in flight"),
        None if args.no_results_md else markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
