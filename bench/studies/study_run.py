"""What a by-hand study records of its own run: the command, where it pinned the server and
itself, the machine, the load average at its start and end, and how long it took."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.loadgen.cpu import pin_self
from bench.loadgen.environment import environment, machine
from bench.results_md import replace_section


@dataclass
class StudyRun:
    command: str
    #: None on a one-CPU machine: the server runs where the kernel puts it.
    server_cpus: str | None
    client_cpus: list[int]
    machine: dict[str, Any]
    load_at_start: float
    started: float = field(default_factory=time.monotonic)

    def record(self) -> dict[str, Any]:
        """The run's fields of the study's JSON document."""
        return {
            "command": self.command,
            "environment": {**environment(None), "machine": self.machine},
            "loadavg": [round(self.load_at_start, 2), round(os.getloadavg()[0], 2)],
            "elapsed_s": round(time.monotonic() - self.started, 1),
        }

    def document(self, benchmark: str, args: Any, **fields: Any) -> dict[str, Any]:
        """A closed-loop study's JSON document: its name, the date, the run's fields, where
        it ran, the step lengths and repeats of ``args``, then ``fields``."""
        return {
            "benchmark": benchmark,
            "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            **self.record(),
            **self.pinning,
            "seconds": args.seconds, "warmup": args.warmup, "repeats": args.repeats,
            **fields,
        }

    @property
    def pinning(self) -> dict[str, str]:
        return {"server_cpus": self.server_cpus or "any",
                "client_cpus": ",".join(map(str, self.client_cpus))}


def start_study(module: str, argv: Sequence[str] | None, server_cpus: str,
                client_cpus: str) -> StudyRun:
    """Pin this process (the load) to ``client_cpus`` and note the run's start; the server
    goes to ``server_cpus`` (both only when there is more than one CPU)."""
    import sys

    command = shlex.join(["python", "-m", module, *(argv if argv is not None
                                                   else sys.argv[1:])])
    multi_cpu = len(os.sched_getaffinity(0)) > 1
    this_machine = machine()
    load = os.getloadavg()[0]
    return StudyRun(command, server_cpus if multi_cpu else None,
                    pin_self(client_cpus) if multi_cpu else sorted(os.sched_getaffinity(0)),
                    this_machine, load)


def study_arguments(doc: str | None, repeats: int = 3, pinned: bool = True
                    ) -> argparse.ArgumentParser:
    """A study's parser with the options every study takes (its docstring's first line as
    the description): --seconds and --warmup per step, --repeats, --no-results-md and, for a
    study that pins, --server-cpus and --client-cpus. The study adds its own."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0] if doc else None)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=repeats)
    if pinned:
        parser.add_argument("--server-cpus", default="0")
        parser.add_argument("--client-cpus", default="1")
    parser.add_argument("--no-results-md", action="store_true")
    return parser


def write_document(path: Path, document: dict[str, Any]) -> None:
    """The study's JSON document, under bench/results."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=1) + "\n", encoding="utf-8")


def publish(path: Path, document: dict[str, Any], chart: Callable[[], None],
            section: Callable[[dict[str, Any]], str] | None) -> None:
    """A study's results: its JSON document, its chart, and its RESULTS.md section (None:
    --no-results-md)."""
    write_document(path, document)
    chart()
    if section is not None:
        replace_section(section(document))
    print(f"wrote {path}", file=sys.stderr)
