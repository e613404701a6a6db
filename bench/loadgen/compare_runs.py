"""``peregrine bench compare a.json b.json ...``: ratios against the first run, one chart.

Steps are matched by their load (concurrency or rate); a ratio above 1 means the later run
has more throughput or a longer latency than the first.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from bench.loadgen.plots import plot_runs
from bench.loadgen.schema import validate_run
from bench.loadgen.table import step_key, text_table

Figure = Callable[[dict[str, Any]], float]
_RATIO_FIGURES: tuple[tuple[str, Figure], ...] = (("infer/s", lambda s: s["throughput_rps"]),
                  ("p50", lambda s: s["latency_ms"]["p50"]),
                  ("p99", lambda s: s["latency_ms"]["p99"]),
                  ("p99.9", lambda s: s["latency_ms"]["p99.9"]))


def load_run(path: Path) -> dict[str, Any]:
    document = json.loads(path.read_text(encoding="utf-8"))
    validate_run(document)
    return dict(document)


def default_label(document: dict[str, Any], path: Path) -> str:
    return str(document["inputs"].get("label") or path.stem)


def _ratio(value: float, base: float) -> str:
    return f"{value / base:.2f}x" if base else "n/a"


def ratio_table(documents: Sequence[dict[str, Any]], labels: Sequence[str]) -> str:
    base_doc = documents[0]
    header = ["load", "run", *(f"{name}" for name, _ in _RATIO_FIGURES),
              *(f"{name} ratio" for name, _ in _RATIO_FIGURES)]
    rows: list[list[str]] = []
    base_steps = {step_key(s): s for s in base_doc["steps"]}
    unmatched: list[str] = []
    for doc, label in zip(documents, labels, strict=True):
        for step in doc["steps"]:
            key = step_key(step)
            base = base_steps.get(key)
            if base is None:
                unmatched.append(f"{label} {key}")
                continue
            values = [f"{figure(step):,.3f}" if name != "infer/s" else f"{figure(step):,.0f}"
                      for name, figure in _RATIO_FIGURES]
            ratios = [_ratio(figure(step), figure(base)) for _, figure in _RATIO_FIGURES]
            rows.append([key, label, *values, *ratios])
    rows.sort(key=lambda row: (float(row[0].removeprefix("c=").removesuffix("/s")), ))
    text = text_table(header, rows)
    if unmatched:
        text += f"\nno step of {labels[0]} at the same load: " + ", ".join(unmatched)
    return text


def compare(paths: Sequence[Path], plot: Path | None, labels: Sequence[str] | None = None
            ) -> str:
    if len(paths) < 2:
        raise ValueError("compare needs at least two run files")
    documents = [load_run(path) for path in paths]
    names = list(labels) if labels else [default_label(d, p) for d, p in
                                         zip(documents, paths, strict=True)]
    if len(names) != len(documents):
        raise ValueError("give one label per run file")
    if len(set(names)) < len(names):
        names = [f"{name} ({index + 1})" for index, name in enumerate(names)]
    text = ratio_table(documents, names)
    if plot is not None:
        plot_runs(documents, names, plot, title=" vs ".join(names))
        text += f"\nchart: {plot}"
    return text
