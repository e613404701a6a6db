"""PNG charts of one or more runs (matplotlib, Agg backend, no display needed).

One figure, three panels: throughput against the sweep variable (concurrency or offered
rate), latency percentiles against it, and latency CDFs (every step of a single run; the
heaviest step of each run when several are drawn together).
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.lines import Line2D
from matplotlib.ticker import FuncFormatter, NullFormatter

from bench.loadgen.histogram import LatencyHistogram
from bench.loadgen.table import step_key

LineStyle = Literal["-", ":", "--", "-."]
_PERCENTILE_STYLES: tuple[tuple[str, LineStyle], ...] = (
    ("p50", "-"), ("p90", ":"), ("p99", "--"), ("p99.9", "-."))


def _x(step: dict[str, Any]) -> float:
    return float(step["concurrency"] if step["concurrency"] is not None else step["rate"])


def _x_label(documents: Sequence[dict[str, Any]]) -> str:
    sweeps = {doc["inputs"]["sweep"] for doc in documents}
    if sweeps == {"rate"}:
        return "offered rate (requests/s)"
    return "requests in flight" if sweeps == {"concurrency"} else "concurrency / rate"


def _set_x_scale(axis: Any, xs: Sequence[float]) -> None:
    """Log scale for wide sweeps (1..64), ticks at the swept values, written plainly."""
    if xs and min(xs) > 0 and max(xs) / min(xs) >= 8:
        axis.set_xscale("log", base=2)
        ticks = sorted(set(xs))
        axis.set_xticks(ticks, [f"{t:g}" for t in ticks])
        axis.minorticks_off()


def plot_runs(documents: Sequence[dict[str, Any]], labels: Sequence[str], path: Path,
              title: str = "") -> Path:
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    figure, (through, latency, cdf) = plt.subplots(1, 3, figsize=(15, 4.4))
    all_x: list[float] = []
    for index, (doc, label) in enumerate(zip(documents, labels, strict=True)):
        color = colors[index % len(colors)]
        steps = sorted(doc["steps"], key=_x)
        xs = [_x(s) for s in steps]
        all_x += xs
        through.plot(xs, [s["throughput_rps"] for s in steps], "o-", color=color, label=label)
        # Several runs: p50 and p99 only, or the panel turns into a thicket.
        styles = _PERCENTILE_STYLES if len(documents) == 1 else (_PERCENTILE_STYLES[0],
                                                                 _PERCENTILE_STYLES[2])
        for key, style in styles:
            latency.plot(xs, [s["latency_ms"][key] for s in steps], style, marker=".",
                         color=color, label=key if len(documents) == 1 else None)
        shown = steps if len(documents) == 1 else steps[-1:]
        for number, step in enumerate(shown):
            points = LatencyHistogram.decode(step["histogram"]).cdf_ms()
            if not points:
                continue
            shade = (colors[number % len(colors)] if len(documents) == 1 else color)
            name = step_key(step) if len(documents) == 1 else f"{label} {step_key(step)}"
            cdf.plot([p[0] for p in points], [p[1] for p in points], color=shade, label=name)
    through.set(title="throughput", xlabel=_x_label(documents), ylabel="infer/s")
    through.set_ylim(bottom=0)
    latency.set(title="latency percentiles", xlabel=_x_label(documents), ylabel="ms")
    latency.set_yscale("log")
    cdf.set(title="latency CDF", xlabel="ms", ylabel="fraction of requests")
    cdf.set_xscale("log")
    cdf.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    cdf.xaxis.set_minor_formatter(NullFormatter())
    for axis in (through, latency):
        _set_x_scale(axis, all_x)
    for axis in (through, latency, cdf):
        axis.grid(True, which="both", alpha=0.3)
    through.legend(fontsize=7)
    if len(documents) == 1:
        latency.legend(fontsize=7)
    else:  # colours are the runs (see the throughput panel); line styles the percentiles
        latency.legend(handles=[Line2D([], [], color="grey", linestyle=style, label=key)
                                for key, style in (_PERCENTILE_STYLES[0], _PERCENTILE_STYLES[2])],
                       fontsize=7)
    cdf.legend(fontsize=7)
    if title:
        figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    figure.savefig(buffer, dpi=72, format="png")
    plt.close(figure)
    # A 64-colour palette keeps a chart around a fifth of its RGBA size, legible still.
    from PIL import Image

    buffer.seek(0)
    with Image.open(buffer) as image:
        image.convert("RGB").quantize(colors=64).save(path, optimize=True)
    return path
