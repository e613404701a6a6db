"""``peregrine drift report``: the stored windows of a version against its reference.

Reads the sample store the server writes (no server needed), re-evaluates the newest rows with
the same detectors the server uses, and renders a table (worst feature first) and a PNG:
reference vs live histograms of the most drifted features, and the drift score per stored
window over time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from server.drift import measures
from server.drift.detect import (
    FeatureResult,
    Level,
    WindowReport,
    category_buckets,
    category_counts,
    evaluate,
)
from server.drift.options import Thresholds
from server.drift.profile import NumericProfile, ReferenceProfile
from server.drift.store import StoredWindow, to_block
from server.drift.window import Block, concat

if TYPE_CHECKING:
    from matplotlib.axes import Axes


@dataclass(frozen=True, slots=True)
class HistoryPoint:
    sequence: int
    closed: str
    rows: int
    score: float
    level: Level


@dataclass(frozen=True, slots=True)
class DriftReport:
    latest: WindowReport
    live: Block
    history: tuple[HistoryPoint, ...]
    thresholds: Thresholds


def build(
    profile: ReferenceProfile,
    windows: list[StoredWindow],
    thresholds: Thresholds,
    rows: int,
) -> DriftReport:
    """Evaluate the newest ``rows`` stored rows, and every stored window for the history."""
    if not windows:
        raise ValueError("no stored windows")
    blocks = [to_block(w.columns, profile) for w in windows]
    history = []
    for window, block in zip(windows, blocks, strict=True):
        result = evaluate(profile, block, thresholds, "fixed", window.sequence)
        history.append(HistoryPoint(window.sequence, str(window.meta.get("closed", "")),
                                    block.rows, result.score, result.level))
    recent: list[Block] = []
    total = 0
    for block in reversed(blocks):
        recent.insert(0, block)
        total += block.rows
        if total >= rows:
            break
    live = concat(recent)
    live = live.take(slice(max(0, live.rows - rows), None))
    latest = evaluate(profile, live, thresholds, "report", windows[-1].sequence)
    return DriftReport(latest, live, tuple(history), thresholds)


def _fmt(value: float, spec: str) -> str:
    return "-" if math.isnan(value) else format(value, spec)


def table(report: DriftReport) -> str:
    latest = report.latest
    head = (f"model {latest.model} version {latest.version}: {latest.rows} live rows, "
            f"drift score {latest.score:.3f}, level {latest.level.label}")
    columns = ("feature", "kind", "rows", "psi", "p-value", "js", "missing", "out-of-range",
               "level", "reasons")
    lines = [
        (f.feature, f.kind.value, str(f.rows), _fmt(f.psi, ".4f"), _fmt(f.pvalue, ".3g"),
         _fmt(f.js, ".3f"), f"{f.missing_rate:.1%}", f"{f.out_of_range:.1%}", f.level.label,
         ", ".join(f.reasons))
        for f in latest.worst()
    ]
    widths = [max(len(c), *(len(line[i]) for line in lines)) if lines else len(c)
              for i, c in enumerate(columns)]
    rendered = [head, "  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    rendered += ["  ".join(v.ljust(w) for v, w in zip(line, widths, strict=True)).rstrip()
                 for line in lines]
    return "\n".join(rendered)


def plot(report: DriftReport, profile: ReferenceProfile, path: Path, top: int = 4) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    worst = [f for f in report.latest.worst(top) if f.rows]
    panels = len(worst) + 1
    cols = min(3, panels)
    rows = math.ceil(panels / cols)
    figure, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.6 * rows), squeeze=False)
    flat = list(axes.ravel())
    for axis, result in zip(flat, worst, strict=False):
        _histogram_panel(axis, result, profile, report.live)
    _history_panel(flat[len(worst)], report)
    for axis in flat[panels:]:
        axis.set_visible(False)
    latest = report.latest
    figure.suptitle(f"drift: {latest.model} v{latest.version}, score {latest.score:.3f} "
                    f"({latest.level.label}), {latest.rows} live rows")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=90)
    plt.close(figure)


def _histogram_panel(axis: Axes, result: FeatureResult, profile: ReferenceProfile,
                     live: Block) -> None:
    tensor = profile.tensor(result.tensor)
    assert tensor is not None
    index = tensor.feature_names.index(result.feature)
    feature = tensor.features[index]
    column = live.values[result.tensor][:, index]
    present = live.present.get(result.tensor)
    if present is not None:
        column = column[present]
    if isinstance(feature, NumericProfile):
        values = np.asarray(column, dtype=np.float64)
        values = values[~np.isnan(values)]
        edges = feature.edges
        reference = feature.proportions
        current = measures.histogram(values, edges) / max(1, values.size)
        labels = [f"≤{e:.3g}" for e in edges] + [f">{edges[-1]:.3g}" if edges.size else "all"]
    else:
        kept = [v for v in column.tolist() if v is not None]
        counts = category_counts(feature, np.asarray(kept, dtype=object))
        reference = np.asarray([*feature.categories.values(), feature.other, 0.0])
        current = counts / max(1, len(kept))
        order = np.argsort(-(reference + current))[:12]
        reference, current = reference[order], current[order]
        buckets = category_buckets(feature)
        labels = [buckets[i] for i in order]
    x = np.arange(len(labels))
    axis.bar(x - 0.2, reference, width=0.4, label="reference")
    axis.bar(x + 0.2, current, width=0.4, label="live")
    axis.set_xticks(x, labels, rotation=60, fontsize=7)
    axis.set_ylabel("share")
    axis.set_title(f"{result.feature} [{result.level.label}] psi {_fmt(result.psi, '.3f')}",
                   fontsize=9)
    axis.legend(fontsize=7)


def _history_panel(axis: Axes, report: DriftReport) -> None:
    points = report.history
    x = [p.sequence for p in points]
    scores = [p.score for p in points]
    colors = {Level.OK: "tab:green", Level.WARNING: "tab:orange", Level.ALERT: "tab:red"}
    axis.plot(x, scores, color="tab:gray", linewidth=1)
    axis.scatter(x, scores, c=[colors[p.level] for p in points], zorder=3)
    limits = report.thresholds
    axis.axhline(limits.psi_warning, color="tab:orange", linestyle="--", linewidth=0.8)
    axis.axhline(limits.psi_alert, color="tab:red", linestyle="--", linewidth=0.8)
    axis.set_xlabel("stored window")
    axis.set_ylabel("drift score (max PSI)")
    axis.set_title("drift score per window (green ok, orange warning, red alert)", fontsize=9)
