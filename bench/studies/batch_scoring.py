"""peregrine batch against in-process ONNX Runtime on the MLP: rows per second at one batch size.

Four ways to score rows of random features at ``--batch-size`` rows per call, each in this
process. ``ONNX Runtime session.run`` (the version's own InferenceSession called as a
user's loop would: a reference), ``in-process backend`` (the server's ONNX Runtime backend
instance called directly, as a loop over the rows: the ceiling the goal names) and
``scoring (no database)`` (what ``peregrine batch`` does with the file's chunks, without
the writes: for this one-instance model, every chunk of 16 batches scored in one hop on
the instance's thread, each batch a row slice through the version's backend call,
OfflineModel.score_chunks, each chunk's outputs joined on that thread) are
timed in rotating order over the same block of ``--block-rows`` rows, ``--rounds`` times,
and each figure is the rows over its summed time: the machine's speed swings between
runs by more than the difference measured, and alternating small blocks puts every way
under the same swings. ``peregrine batch (SQLite)`` (``score_file`` end to end: reading
the .npz, scoring, writing every prediction into a fresh SQLite file in the writer
thread) runs ``--repeats`` times over ``--rows`` rows; its median is reported. The goal:
scoring at least 90% of the backend; the end-to-end figure shows what reading the file
and the database add.

    python -m bench.studies.batch_scoring [--rounds 200] [--block-rows 16384] [--rows 100000]
                                          [--batch-size 64] [--repeats 3]
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
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bench.loadgen.environment import environment, machine
from bench.results_md import RESULTS_DIR, replace_section, section_header
from bench.studies.study_run import study_arguments, write_document
from server.app import open_model_offline, open_offline
from server.backends.onnxruntime import OnnxRuntimeInstance
from server.batch import runner
from server.batch.sink import Sink

SECTION = "## Batch scoring (peregrine batch)"
RESULTS_JSON = RESULTS_DIR / "batch_scoring.json"
RESULTS_PNG = RESULTS_DIR / "batch_scoring.png"
GOAL = 0.90
MODEL = "mlp_classifier"
SESSION_RUN = "ONNX Runtime session.run"
BACKEND = "in-process backend"
SCORING = "scoring (no database)"
END_TO_END = "peregrine batch (SQLite)"


async def _alternating(repo: Path, x: np.ndarray, batch: int, block: int,
                      rounds: int) -> dict[str, list[float]]:
    """Seconds per round of the backend loop and of score_chunks over the same block of
    rows, alternating (the block moves through ``x``)."""
    _, load = open_model_offline(repo, MODEL)
    backend = load("2")
    model = await open_offline(repo, MODEL, "2")
    assert isinstance(backend, OnnxRuntimeInstance)
    session = backend.session
    chunk = 16 * batch
    spans = [(begin, min(begin + chunk, block)) for begin in range(0, block, chunk)]

    def session_run(rows: np.ndarray) -> None:
        for begin in range(0, block, batch):
            session.run(None, {"input": rows[begin:begin + batch]})

    def backend_loop(rows: np.ndarray) -> None:
        for begin in range(0, block, batch):
            backend.execute({"input": rows[begin:begin + batch]})

    async def scoring(rows: np.ndarray) -> None:
        await model.score_chunks({"input": rows}, spans, batch, lambda outputs: None)

    ways: dict[str, Callable[[np.ndarray], Awaitable[None] | None]] = {
        SESSION_RUN: session_run, BACKEND: backend_loop, SCORING: scoring}
    seconds: dict[str, list[float]] = {name: [] for name in ways}
    try:
        for round_ in range(rounds):
            first = (round_ * block) % (len(x) - block + 1)
            rows = x[first:first + block]
            names = list(ways)[round_ % len(ways):] + list(ways)[:round_ % len(ways)]
            for name in names:
                start = time.perf_counter()
                pending = ways[name](rows)
                if pending is not None:
                    await pending
                seconds[name].append(time.perf_counter() - start)
    finally:
        backend.close()
        await model.close()
    return seconds


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


def measure(repo: Path, rounds: int, block: int, rows: int, batch: int,
            repeats: int) -> tuple[dict[str, float], dict[str, Any]]:
    """Rows/s of each way, and the details behind them for the JSON document."""
    x = np.random.default_rng(0).random((max(rows, block), 64), dtype=np.float32)
    seconds = asyncio.run(_alternating(repo, x, batch, block, rounds))
    rates = {name: round(rounds * block / sum(values), 1) for name, values in seconds.items()}
    ratios = [scoring / backend for backend, scoring in zip(
        seconds[BACKEND], seconds[SCORING], strict=True)]
    end_to_end = [round(asyncio.run(_end_to_end(repo, x[:rows], batch)), 1)
                  for _ in range(repeats)]
    rates[END_TO_END] = statistics.median(end_to_end)
    quartiles = statistics.quantiles(ratios, n=4)
    details = {"round_seconds": {name: [round(s, 6) for s in values]
                                 for name, values in seconds.items()},
               "end_to_end_runs": end_to_end,
               "round_time_ratio_quartiles": [round(q, 3) for q in quartiles]}
    return rates, details


def write_section(document: dict[str, Any]) -> None:
    lines = section_header(SECTION, document)
    low, high = document["round_time_ratio_quartiles"][0::2]
    lines += [
        f"`{MODEL}` version 2, 64 random features per row, {document['batch_size']} rows per "
        "call, in one process, not pinned. The first three ways alternate over the "
        f"same block of {document['block_rows']:,} rows, {document['rounds']} times; each "
        "figure is the rows over its summed time (the scoring's time per round was "
        f"{low:.2f} to {high:.2f}x the backend's, quartiles). The end-to-end figure is the "
        f"median of {document['repeats']} runs over {document['rows']:,} rows. 1-minute load "
        f"average at start and end: {document['loadavg'][0]} and {document['loadavg'][1]} "
        "(the machine is shared: indicative).", "",
        "| way | rows/s | vs in-process backend | vs session.run |", "|---|---:|---:|---:|",
    ]
    rates = document["rates"]
    for name, value in rates.items():
        lines.append(f"| {name} | {value:,.0f} | {value / rates[BACKEND]:.0%} | "
                     f"{value / rates[SESSION_RUN]:.0%} |")
    lines += ["", f"Goal: scoring at least {GOAL:.0%} of the in-process backend — "
              f"{'met' if document['goal_met'] else '**not met**'}.", "",
              f"Chart: [batch_scoring.png](results/{RESULTS_PNG.name})", ""]
    replace_section("\n".join(lines))


def main(argv: Sequence[str] | None = None) -> int:
    parser = study_arguments(__doc__, pinned=False)
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--block-rows", type=int, default=16384)
    parser.add_argument("--rows", type=int, default=100000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repository", type=Path, default=Path("examples/models"))
    args = parser.parse_args(argv)
    # Not pinned: the scoring and the writer thread share the process's CPUs.
    load = os.getloadavg()[0]
    started = time.monotonic()
    rates, details = measure(args.repository, args.rounds, args.block_rows, args.rows,
                             args.batch_size, args.repeats)
    document = {
        "benchmark": "batch_scoring",
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": shlex.join(["python", "-m", "bench.studies.batch_scoring",
                               *(argv if argv is not None else sys.argv[1:])]),
        "environment": {**environment(None), "machine": machine()},
        "loadavg": [round(load, 2), round(os.getloadavg()[0], 2)],
        "elapsed_s": round(time.monotonic() - started, 1),
        "rounds": args.rounds, "block_rows": args.block_rows, "rows": args.rows,
        "batch_size": args.batch_size, "repeats": args.repeats,
        "rates": rates, **details,
        "goal_met": rates[SCORING] >= GOAL * rates[BACKEND],
    }
    write_document(RESULTS_JSON, document)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.barh(list(rates), list(rates.values()))
    ax.set_xlabel("rows/s")
    ax.set_title(f"{MODEL}, batch {args.batch_size}")
    fig.tight_layout()
    fig.savefig(RESULTS_PNG, dpi=110)
    if not args.no_results_md:
        write_section(document)
    print(f"wrote {RESULTS_JSON}: {rates}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
