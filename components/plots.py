"""Plots of the evaluate stage: PNG figures (matplotlib, no GUI) and DVC plots CSV files.

Figures are drawn on a bare `matplotlib.figure.Figure` (Agg canvas, no pyplot global state), so
they work headless and in threads. Every file is written atomically.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from components.io import atomic_path


def _save(fig: Any, path: Path) -> Path:
    with atomic_path(path, "wb") as fh:
        fig.savefig(fh, format="png", dpi=120, bbox_inches="tight")
    return path


def line_plot(
    series: Mapping[str, Mapping[float, float | None]],
    path: str | Path,
    *,
    title: str,
    x_label: str,
    y_label: str,
    log2_x: bool = False,
    dashed: Sequence[str] = (),
) -> Path:
    """One line per series (x -> y; null y values are left out); saved as PNG at `path`."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.2))
    ax = fig.add_subplot()
    xs_all: set[float] = set()
    for name, points in series.items():
        pts = sorted((x, y) for x, y in points.items() if y is not None and not math.isnan(y))
        if not pts:
            continue
        xs_all.update(x for x, _ in pts)
        ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o",
                linestyle="--" if name in dashed else "-", linewidth=1.0 if name in dashed else 2.0,
                label=name)
    if log2_x:
        ax.set_xscale("log", base=2)
        if xs_all:
            ax.set_xticks(sorted(xs_all), [f"{x:g}" for x in sorted(xs_all)])
    ax.set_title(title)
    ax.set_xlabel(x_label)
    ax.set_ylabel(y_label)
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    return _save(fig, Path(path))


def bar_plot(
    groups: Mapping[str, Mapping[str, float | None]], path: str | Path, *, title: str, y_label: str
) -> Path:
    """Grouped bars: one group per category (outer keys of each series), one bar per series."""
    from matplotlib.figure import Figure

    categories: list[str] = []
    for values in groups.values():
        categories += [c for c in values if c not in categories]
    fig = Figure(figsize=(max(6.4, 0.7 * len(categories) * max(1, len(groups))), 4.2))
    ax = fig.add_subplot()
    width = 0.8 / max(1, len(groups))
    for g, (name, values) in enumerate(groups.items()):
        xs = [i + g * width for i in range(len(categories))]
        ys = [values.get(c) for c in categories]
        ax.bar(xs, [0.0 if y is None else y for y in ys], width=width, label=name)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(categories))], categories, rotation=35, ha="right")
    ax.set_title(title)
    ax.set_ylabel(y_label)
    ax.grid(True, axis="y", alpha=0.3)
    if groups:
        ax.legend(fontsize=8)
    return _save(fig, Path(path))


def write_csv(path: str | Path, rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> Path:
    """Rows as CSV with the given columns (null -> empty cell), written atomically."""
    path = Path(path)
    with atomic_path(path) as fh:
        writer = csv.DictWriter(fh, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        for row in rows:
            writer.writerow({c: ("" if row.get(c) is None else row.get(c)) for c in columns})
    return path
