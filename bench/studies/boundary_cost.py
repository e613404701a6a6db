"""What the frontend/engine boundary costs, against an earlier revision: ModelReady in a
closed loop (bench/studies/ready_load.py, 64 in flight; no batching and no model, so the
per-call path alone) through ``--frontends 2`` of this tree and of ``--baseline REV``, and
through one process of this tree, alternated round by round with a fresh server each.

Reported per set-up: calls per second, the server's CPU per call summed over its process
tree, and its root process's alone (with frontends, the engine's: where a change to the
engine's side of the boundary shows without the frontends' noise). The boundary's cost is a
set-up's tree CPU per call less the one process's. The whole server on ``--server-cpus``,
the load on ``--client-cpus``; a baseline runs from a git worktree with this tree's builds
(bench/studies/revisions.py).

    python -m bench.studies.boundary_cost --baseline REV [--repeats 4]
"""

from __future__ import annotations

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
from bench.studies.frontends import MODEL, ready_step
from bench.studies.revisions import (
    baseline_tree,
    closing_lines,
    git,
    revision_arguments,
    server_at,
)
from bench.studies.study_run import publish, start_study

SECTION = "## Frontend/engine boundary against an earlier revision"
RESULTS_JSON = RESULTS_DIR / "boundary_cost.json"
RESULTS_PNG = RESULTS_DIR / "boundary_cost.png"


def _median(runs: list[dict[str, Any]], key: str) -> float:
    return float(statistics.median(r[key] for r in runs))


def markdown(document: dict[str, Any]) -> str:
    rows = document["setups"]
    one = next(r for r in rows if r["frontends"] == 1)
    lines = [
        *section_header(SECTION, document),
        f"The whole server on CPU {document['server_cpus']} (example `{MODEL}`), the load "
        f"on CPU {document['client_cpus']}: ModelReady, 64 in flight, {document['seconds']} s "
        f"per step after {document['warmup']} s, {document['repeats']} rounds alternating "
        "the set-ups, a fresh server each; medians. Root process: the engine with frontends, "
        "the whole server without.", "",
        "| set-up | calls/s | server CPU us/call (tree) | root process us/call | "
        "boundary us/call (tree less one process) | root us/call per round |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for row in rows:
        boundary = row["tree_us"] - one["tree_us"]
        lines.append(
            f"| {row['label']} `{row['revision'][:10]}` --frontends {row['frontends']} "
            f"| {row['calls_per_s']:,.0f} | {row['tree_us']:.1f} | {row['root_us']:.1f} "
            f"| {boundary:+.1f} | " + ", ".join(f"{v:.0f}" for v in row["root_us_runs"])
            + " |")
    lines += closing_lines(document, RESULTS_PNG, RESULTS_JSON, "boundary cost")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = revision_arguments(__doc__).parse_args(argv)
    study = start_study("bench.studies.boundary_cost", argv, args.server_cpus,
                        args.client_cpus)
    args.client_cpus = ",".join(map(str, study.client_cpus))
    revisions = {"baseline": git("rev-parse", args.baseline),
                 "this tree": git("rev-parse", "HEAD")}
    setups = (("baseline", 2), ("this tree", 2), ("this tree", 1))
    runs: dict[tuple[str, int], list[dict[str, Any]]] = {setup: [] for setup in setups}
    with tempfile.TemporaryDirectory(prefix="boundary-cost-") as tmp, \
            baseline_tree(revisions["baseline"]) as old_tree:
        repo = comparison_repository(ensure_examples([MODEL]), Path(tmp) / "models", [MODEL],
                                     batching=True)
        roots = {"baseline": old_tree, "this tree": REPO_ROOT}
        for round_ in range(args.repeats):
            for label, count in setups:
                with server_at(roots[label], repo, study.server_cpus,
                               "--frontends", str(count)) as server:
                    figures = ready_step(server, args)
                runs[(label, count)].append(figures)
                print(f"round {round_ + 1} {label} --frontends {count}: {figures}",
                      file=sys.stderr, flush=True)
    rows: list[dict[str, Any]] = [
        {"label": label, "revision": revisions[label], "frontends": count,
         "calls_per_s": _median(mine, "throughput_rps"),
         "tree_us": _median(mine, "server_cpu_us_per_request"),
         "root_us": _median(mine, "root_cpu_us_per_request"),
         "root_us_runs": [r["root_cpu_us_per_request"] for r in mine], "runs": mine}
        for (label, count), mine in runs.items()]
    document = study.document("boundary_cost", args, setups=rows)
    publish(RESULTS_JSON, document, lambda: grouped_bars(
        RESULTS_PNG, [f"{r['label']}\n--frontends {r['frontends']}" for r in rows],
        {"tree us/call": [r["tree_us"] for r in rows],
         "root process us/call": [r["root_us"] for r in rows]},
        "server CPU us per call", f"ModelReady, {MODEL}, 64 in flight"),
        None if args.no_results_md else markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
