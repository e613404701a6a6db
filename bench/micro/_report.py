"""Shared by the micro-benchmarks: timing (medians of repeats), machine facts, JSON and PNG."""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import statistics
import timeit
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from bench.loadgen.environment import cpu_model, git_revision


def timings(fn: Callable[[], object], repeat: int, min_time: float) -> dict[str, float]:
    """Seconds per call: median, quartiles and min over ``repeat`` runs of >= ``min_time`` s.

    The machine is shared and has two cores: single runs are noisy, so every figure we
    report is the median of the repeats; the quartiles show how noisy it was."""
    timer = timeit.Timer(fn)
    fn()  # warm caches, pools and lazily created threads
    number = 1
    while timer.timeit(number) < min_time:
        number *= 2
    runs = sorted(t / number for t in timer.repeat(repeat=repeat, number=number))
    q1, _, q3 = statistics.quantiles(runs, n=4) if len(runs) > 1 else (runs[0],) * 3
    return {"median_s": statistics.median(runs), "q1_s": q1, "q3_s": q3, "min_s": runs[0],
            "calls_per_run": number, "runs": len(runs)}


def paired(fns: dict[str, Callable[[], object]], repeat: int,
           min_time: float) -> dict[str, dict[str, float]]:
    """Like ``timings`` for several implementations, their runs interleaved (A B A B ...) so
    that load from other processes drifting over time hits them alike."""
    timers = {name: timeit.Timer(fn) for name, fn in fns.items()}
    numbers = {}
    for name, fn in fns.items():
        fn()
        number = 1
        while timers[name].timeit(number) < min_time:
            number *= 2
        numbers[name] = number
    runs: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeat):
        for name, timer in timers.items():
            runs[name].append(timer.timeit(numbers[name]) / numbers[name])
    out = {}
    for name, values in runs.items():
        values.sort()
        q1, _, q3 = statistics.quantiles(values, n=4) if len(values) > 1 else (values[0],) * 3
        out[name] = {"median_s": statistics.median(values), "q1_s": q1, "q3_s": q3,
                     "min_s": values[0], "calls_per_run": numbers[name], "runs": len(values)}
    return out


def machine() -> dict[str, Any]:
    import numpy as np

    return {
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "git_revision": git_revision(short=True),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "machine": platform.machine(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "load_average": list(os.getloadavg()),
    }


def write_json(path: Path, report: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")


def bar_chart(path: Path, title: str, groups: Sequence[str],
              series: dict[str, Sequence[float | None]], ylabel: str,
              notes: Sequence[str] = ()) -> None:
    """Grouped bars (log scale), one group per case, one bar per implementation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(max(7.0, 1.9 * len(groups) + 3), 4.6))
    width = 0.8 / max(1, len(series))
    for i, (label, values) in enumerate(series.items()):
        xs = [g + (i - (len(series) - 1) / 2) * width for g in range(len(groups))]
        heights = [v if v is not None else 0.0 for v in values]
        bars = axis.bar(xs, heights, width, label=label)
        for bar, v in zip(bars, values, strict=True):
            if v is not None:
                axis.annotate(f"{v:.3g}", (bar.get_x() + bar.get_width() / 2, v),
                              ha="center", va="bottom", fontsize=7)
    axis.set_yscale("log")
    axis.set_xticks(range(len(groups)), groups, fontsize=8)
    axis.set_ylabel(ylabel)
    axis.set_title(title, fontsize=10)
    axis.legend(fontsize=8)
    for k, note in enumerate(notes):
        figure.text(0.01, 0.01 + 0.035 * k, note, fontsize=7)
    figure.tight_layout(rect=(0, 0.04 * len(notes), 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
