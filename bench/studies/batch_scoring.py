"""peregrine batch against in-process ONNX Runtime on the MLP: rows per second at one batch size.

Three ways to score the same rows of random features at ``--batch-size`` rows per call, each
in this process, medians of ``--repeats`` runs in rotating order: ``in-process backend`` (the
server's ONNX Runtime backend instance called directly, as a loop over the rows: the
ceiling), ``scoring (no database)`` (what ``peregrine batch`` does with the file's chunks,
without the writes: for this one-instance model, every chunk of 16 batches scored in one hop
on the instance's thread, each batch a row slice through the version's packing and backend
call, OfflineModel.score_chunks) and ``peregrine batch (SQLite)`` (``score_file`` end to
end: reading the .npz, scoring, writing every prediction into a fresh SQLite file in the
writer thread). The goal: scoring at least 90% of the
backend; the end-to-end figure shows what reading the file and the database add.

    python -m bench.studies.batch_scoring [--rows 100000] [--batch-size 64] [--repeats 3]
"""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bench.loadgen.environment import environment, machine
from bench.results_md import RESULTS_DIR, replace_section, section_header
from bench.studies.study_run import study_arguments, write_document
from server.app import open_model_offline, open_offline
from server.batch import runner
from server.batch.sink import Sink

SECTION = "## Batch scoring (peregrine batch)"
RESULTS_JSON = RESULTS_DIR / "batch_scoring.json"
RESULTS_PNG = RESULTS_DIR / "batch_scoring.png"
GOAL = 0.90
MODEL = "mlp_classifier"


def _backend(repo: Path, x: np.ndarray, batch: int) -> float:
    _, load = open_model_offline(repo, MODEL)
    backend = load("2")
    try:
        start = time.perf_counter()
        for begin in range(0, len(x), batch):
            backend.execute({"input": x[begin:begin + batch]})
        return len(x) / (time.perf_counter() - start)
    finally:
        backend.close()


async def _scoring(repo: Path, x: np.ndarray, batch: int) -> float:
    model = await open_offline(repo, MODEL, "2")
    try:
        chunk = 16 * batch
        spans = [(begin, min(begin + chunk, len(x))) for begin in range(0, len(x), chunk)]
        start = time.perf_counter()
        await model.score_chunks({"input": x}, spans, batch, lambda outputs: None)
        return len(x) / (time.perf_counter() - start)
    finally:
        await model.close()


async def _end_to_end(repo: Path, x: np.ndarray, batch: int) -> float:
    model = await open_offline(repo, MODEL, "2")
    with tempfile.TemporaryDirectory() as scratch:
        data = Path(scratch) / "rows.npz"
        np.savez(data, input=x)
        sink = Sink(f"sqlite:///{Path(scratch) / 'out.db'}", "predictions", model.spec)
        sink.create()
        try:
            outcome = await runner.score_file(model, sink, data, runner.Options(
                batch_size=batch, chunk_rows=16 * batch, progress=False))
            return outcome.rows_per_second
        finally:
            sink.close()
            await model.close()


def measure(repo: Path, rows: int, batch: int, repeats: int) -> dict[str, list[float]]:
    x = np.random.default_rng(0).random((rows, 64), dtype=np.float32)
    ways = {
        "in-process backend": lambda: _backend(repo, x, batch),
        "scoring (no database)": lambda: asyncio.run(_scoring(repo, x, batch)),
        "peregrine batch (SQLite)": lambda: asyncio.run(_end_to_end(repo, x, batch)),
    }
    runs: dict[str, list[float]] = {name: [] for name in ways}
    names = list(ways)
    for repeat in range(repeats):
        for name in names[repeat % len(names):] + names[:repeat % len(names)]:
            runs[name].append(round(ways[name](), 1))
    return runs


def write_section(document: dict[str, Any]) -> None:
    lines = section_header(SECTION, document)
    lines += [
        f"{document['rows']:,} rows of 64 random features through `{MODEL}` version 2 at "
        f"{document['batch_size']} rows per call, in one process, not pinned; medians of "
        f"{document['repeats']} runs. 1-minute load average at start and end: "
        f"{document['loadavg'][0]} and {document['loadavg'][1]} (the machine is shared: "
        "indicative).", "",
        "| way | rows/s | vs in-process backend |", "|---|---:|---:|",
    ]
    for name, value in document["medians"].items():
        ratio = value / document["medians"]["in-process backend"]
        lines.append(f"| {name} | {value:,.0f} | {ratio:.0%} |")
    lines += ["", f"Goal: scoring at least {GOAL:.0%} of the in-process backend — "
              f"{'met' if document['goal_met'] else '**not met**'}.", "",
              f"Chart: [batch_scoring.png](results/{RESULTS_PNG.name})", ""]
    replace_section("\n".join(lines))


def main(argv: Sequence[str] | None = None) -> int:
    parser = study_arguments(__doc__, pinned=False)
    parser.add_argument("--rows", type=int, default=100000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repository", type=Path, default=Path("examples/models"))
    args = parser.parse_args(argv)
    # Not pinned: the scoring and the writer thread share the process's CPUs.
    load = os.getloadavg()[0]
    started = time.monotonic()
    runs = measure(args.repository, args.rows, args.batch_size, args.repeats)
    medians = {name: statistics.median(values) for name, values in runs.items()}
    document = {
        "benchmark": "batch_scoring",
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": shlex.join(["python", "-m", "bench.studies.batch_scoring",
                               *(argv if argv is not None else sys.argv[1:])]),
        "environment": {**environment(None), "machine": machine()},
        "loadavg": [round(load, 2), round(os.getloadavg()[0], 2)],
        "elapsed_s": round(time.monotonic() - started, 1),
        "rows": args.rows, "batch_size": args.batch_size, "repeats": args.repeats,
        "runs": runs, "medians": medians,
        "goal_met": medians["scoring (no database)"] >= GOAL * medians["in-process backend"],
    }
    write_document(RESULTS_JSON, document)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.barh(list(medians), list(medians.values()))
    ax.set_xlabel("rows/s")
    ax.set_title(f"{MODEL}, batch {args.batch_size}")
    fig.tight_layout()
    fig.savefig(RESULTS_PNG, dpi=110)
    if not args.no_results_md:
        write_section(document)
    print(f"wrote {RESULTS_JSON}: {medians}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
