"""``peregrine batch --schedule CRON --watch DIR``: at every time the schedule names, score the
input files in the folder (and ``--input``) not scored yet. A file is known by its SHA-256 in
the runs table: one finished is skipped, one half done is resumed, so each file is scored
once however often the schedule fires, across restarts too."""

from __future__ import annotations

import asyncio
import datetime
import logging
from collections.abc import Callable
from pathlib import Path

from server.batch.cron import Cron
from server.batch.runner import Options, Outcome, Scorer, score_file
from server.batch.sink import Sink

log = logging.getLogger(__name__)

SUFFIXES = (".parquet", ".csv", ".npz")


def candidates(folder: Path | None, extra: Path | None) -> list[Path]:
    """The input files of one pass: ``extra``, then the folder's files by name (names that
    start with '.' are files still being written: skipped)."""
    found = [extra] if extra is not None else []
    if folder is not None:
        found += sorted(p for p in folder.iterdir() if p.is_file()
                        and p.suffix.lower() in SUFFIXES and not p.name.startswith("."))
    return found


async def run_schedule(scorer: Scorer, sink: Sink, cron: Cron, folder: Path | None,
                       extra: Path | None, options: Options, stop: asyncio.Event,
                       report: Callable[[Path, Outcome], None]) -> None:
    """Until ``stop`` is set. A file the model cannot read is reported once per pass and left
    where it is; a database that refuses writes ends the loop (the error propagates)."""
    while not stop.is_set():
        now = datetime.datetime.now()
        wait = (cron.next_after(now) - now).total_seconds()
        try:
            await asyncio.wait_for(stop.wait(), wait)
            return
        except TimeoutError:
            pass
        for path in candidates(folder, extra):
            if stop.is_set():
                return
            try:
                outcome = await score_file(scorer, sink, path, options)
            except (ValueError, OSError) as exc:
                log.error("cannot score %s: %s", path, exc)
                continue
            if not outcome.already_done:
                report(path, outcome)
