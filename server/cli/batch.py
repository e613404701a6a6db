"""``peregrine batch``: score a file offline through the server's own data plane into a
database (server/batch). Only argparse at import; numpy, SQLAlchemy and the model are
imported when the command runs."""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import signal
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from server.batch.runner import Outcome, Scorer

    #: (repository, model, version) -> the model served without a transport
    ModelOpener = Callable[[Path, str, str], Awaitable[Scorer]]


def add_batch_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from server.settings import default_repository

    batch = commands.add_parser(
        "batch", help="score a file offline into a database (SQLite, PostgreSQL...)",
        description="Score the rows of a .parquet, .csv or .npz file with a model of the "
        "repository, through the server's own loading, backends, preprocessing and batching "
        "(no gRPC), writing one row of predictions per input row, with its id and the model "
        "version, to a database. Resumable: rerun the same command after an interruption. "
        "See docs/operations.md, 'Batch scoring'.",
    )
    batch.add_argument("--model", required=True)
    batch.add_argument("--model-version", default="",
                       help="version to score with (default: the highest the model serves)")
    batch.add_argument("--input", type=Path, default=None,
                       help="the file to score: .parquet, .csv (with a header) or .npz")
    batch.add_argument("--output", default="sqlite:///preds.db",
                       help="SQLAlchemy database URL (default sqlite:///preds.db)")
    batch.add_argument("--table", default="predictions",
                       help="predictions table (default predictions; also <table>_runs, "
                       "<table>_chunks)")
    batch.add_argument("--repository", type=Path, default=None,
                       help=f"model repository (default {default_repository()})")
    batch.add_argument("--batch-size", type=int, default=0,
                       help="rows per request (default: the model's max_batch_size)")
    batch.add_argument("--chunk-rows", type=int, default=0,
                       help="rows per database transaction, the unit of resumption "
                       "(default 16 requests' worth)")
    batch.add_argument("--id-column", default="id",
                       help="column (or .npz array) of row ids (default id; without it, the "
                       "row number)")
    batch.add_argument("--schedule", default=None,
                       help="cron schedule (5 fields, or 6 with seconds first): keep running "
                       "and score new files at these times")
    batch.add_argument("--watch", type=Path, default=None,
                       help="with --schedule: the folder whose new files are scored")
    batch.add_argument("--no-progress", action="store_true", help="no progress bar")


def run_batch(args: argparse.Namespace, open_model: ModelOpener) -> int:
    if importlib.util.find_spec("sqlalchemy") is None:
        print("peregrine batch: needs SQLAlchemy: pip install 'peregrine[batch]'",
              file=sys.stderr)
        return 2
    if args.schedule is None and args.input is None:
        print("peregrine batch: give --input FILE, or --schedule CRON with --watch DIR",
              file=sys.stderr)
        return 2
    if args.watch is not None and args.schedule is None:
        print("peregrine batch: --watch needs --schedule", file=sys.stderr)
        return 2
    from server.batch.sink import SinkError
    from server.errors import PeregrineError

    try:
        return asyncio.run(_run(args, open_model))
    except (SinkError, ValueError, OSError, PeregrineError) as exc:
        print(f"peregrine batch: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # the chunks written stay marked
        print("peregrine batch: interrupted; the same command resumes the run",
              file=sys.stderr)
        return 130


async def _run(args: argparse.Namespace, open_model: ModelOpener) -> int:
    from server.batch import cron as crons
    from server.batch.runner import Options, check_options, score_file
    from server.batch.sink import Sink
    from server.settings import default_repository

    cron = crons.parse(args.schedule) if args.schedule is not None else None
    if args.watch is not None and not args.watch.is_dir():
        raise ValueError(f"--watch {args.watch}: not a folder")
    scorer = await open_model(args.repository or default_repository(), args.model,
                              args.model_version)
    try:
        spec = scorer.spec
        batch_size = args.batch_size or (spec.max_batch_size if spec.batches else 1)
        options = Options(batch_size=batch_size,
                          chunk_rows=args.chunk_rows or 16 * batch_size,
                          id_column=args.id_column, progress=not args.no_progress)
        check_options(spec, options)
        sink = Sink(args.output, args.table, spec)
        try:
            sink.create()
            if cron is None:
                outcome = await score_file(scorer, sink, args.input, options)
                _report(args, args.input, outcome)
                return 0
            from server.batch.watch import run_schedule

            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, stop.set)
            print(f"peregrine batch: scoring new files of {args.watch} on schedule "
                  f"{args.schedule!r}; stop with Ctrl-C", file=sys.stderr, flush=True)
            await run_schedule(scorer, sink, cron, args.watch, args.input, options, stop,
                               lambda path, outcome: _report(args, path, outcome))
            return 0
        finally:
            sink.close()
    finally:
        await scorer.close()


def _report(args: argparse.Namespace, path: Path, outcome: Outcome) -> None:
    from server.security.redact import redact_uri

    where = f"{redact_uri(args.output)} table {args.table} (run {outcome.run_id})"
    if outcome.already_done:
        print(f"{path}: already scored into {where}; nothing to do", flush=True)
        return
    print(f"{path}: scored {outcome.scored} rows ({outcome.rows} in the file) with "
          f"{args.model} into {where} in {outcome.seconds:.2f} s: "
          f"{outcome.rows_per_second:,.0f} rows/s", flush=True)
