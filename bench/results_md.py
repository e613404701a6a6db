"""One benchmark's own section of bench/RESULTS.md, replaced in place.

The one-off measurements (``bench.studies.drift_overhead``, ``bench.studies.swap_under_load``,
``bench.studies.shm_vs_raw``, ``bench.studies.routing_overhead``, ``bench.studies.soak``) each
own one ``## `` section of RESULTS.md and rewrite only that one; every other section stays as
it is.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_MD = BENCH_DIR / "RESULTS.md"
#: Every benchmark's JSON and PNG files.
RESULTS_DIR = BENCH_DIR / "results"


def section_header(heading: str, document: dict[str, Any]) -> list[str]:
    """The opening lines every one-off benchmark's section shares: heading, date, machine,
    git revision and the command that reproduces it."""
    machine = document["environment"]["machine"]
    return [
        heading, "",
        f"{document['date']} · {machine['nproc']} CPUs ({machine['cpu_model']}) · "
        f"git `{document['environment']['git_revision']}`",
        "", f"Command: `{document['command']}`", "",
    ]


def replace_section(section: str, path: Path = RESULTS_MD) -> None:
    """Replace the section headed by ``section``'s first line (a ``## `` heading), up to the
    next ``## `` heading, or append it at the end. The file is read just before it is
    written, so other sections stay as they are."""
    heading = section.lstrip("\n").splitlines()[0].strip() if section.strip() else ""
    if not heading.startswith("## "):
        raise ValueError(f"a section starts with a '## ' heading, got {heading!r}")
    text = path.read_text(encoding="utf-8") if path.exists() else "# Benchmark results\n"
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.strip() == heading), None)
    if start is None:
        new = text.rstrip("\n") + "\n\n" + section
    else:
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")),
                   len(lines))
        new = "\n".join([*lines[:start], *section.rstrip("\n").splitlines(), "", *lines[end:]])
    path.write_text(new.rstrip("\n") + "\n", encoding="utf-8")


def sections(text: str) -> dict[str, str]:
    """The ``## `` sections of a RESULTS.md text, by heading line, each with its heading."""
    found: dict[str, str] = {}
    heading: str | None = None
    body: list[str] = []
    for line in [*text.splitlines(), "## "]:
        if line.startswith("## "):
            if heading is not None:
                found[heading] = "\n".join(body).rstrip("\n") + "\n"
            heading, body = line.strip(), [line]
        elif heading is not None:
            body.append(line)
    return found


def keep_other_sections(generated: str, path: Path = RESULTS_MD) -> str:
    """``generated`` followed by the sections of the current file that it does not contain
    (the one-off benchmarks' own sections), so regenerating the comparison drops none."""
    if not path.exists():
        return generated
    own = sections(generated)
    kept = [body for heading, body in sections(path.read_text(encoding="utf-8")).items()
            if heading not in own]
    return "\n".join([generated.rstrip("\n"), *kept]).rstrip("\n") + "\n"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join("---:" if i else "---" for i in range(len(header))) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
