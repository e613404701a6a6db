"""One grouped bar chart (a bar per series in each group), as the studies draw their PNGs."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path


def grouped_bars(path: Path, groups: Sequence[str], series: Mapping[str, Sequence[float]],
                 ylabel: str, title: str, size: tuple[float, float] = (9, 4.5)) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=size)
    width = 0.8 / max(1, len(series))
    middle = (len(series) - 1) / 2
    for offset, (label, values) in enumerate(series.items()):
        axis.bar([i + (offset - middle) * width for i in range(len(groups))], values, width,
                 label=label)
    axis.set_xticks(range(len(groups)), groups, fontsize=8)
    axis.set_ylabel(ylabel)
    axis.set_title(title)
    axis.legend()
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
