"""The pipeline's figures (PNG, matplotlib, no GUI) and the CSV tables behind them.

The PNGs are the DVC plots (`dvc plots show` embeds images as they are, so they render offline;
DVC's CSV plots load Vega from a CDN and vanish without a network). The CSVs are plain stage
outputs for other tools. Every figure says what it shows: a title, the model(s), how step rewards
are aggregated, the sample size of each panel (`n = ...`), axes whose limits hold every point
(and say "no data" when there is none), the value of each point or bar written beside it, and
a note under the panel (never over the data).

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

NOTE_STYLE = {"fontsize": 8, "va": "top", "ha": "left",
              "bbox": {"boxstyle": "round", "facecolor": "white", "alpha": 0.8, "edgecolor": "0.8"}}


def _save(fig: Any, path: Path) -> Path:
    with atomic_path(path, "wb") as fh:
        fig.savefig(fh, format="png", dpi=120, bbox_inches="tight")
    return path


def _finite(y: float | None) -> bool:
    return y is not None and not (isinstance(y, float) and math.isnan(y))


def fit_limits(values: Sequence[float], bounds: tuple[float, float] | None = None) -> tuple[float, float]:
    """Axis limits that hold every value with a margin (so a point on the edge stays visible).

    A flat series gets a band around it (a tenth of `bounds`, e.g. (0, 100) for F1, else a fifth
    of the value), shifted to stay inside `bounds` where the value allows; the limits always
    hold min(values) and max(values).
    """
    if not values:
        return bounds if bounds else (0.0, 1.0)
    lo, hi = min(values), max(values)
    if hi > lo:
        pad = 0.08 * (hi - lo)
        return lo - pad, hi + pad
    band = (bounds[1] - bounds[0]) * 0.1 if bounds else max(abs(lo), 1.0) * 0.2
    low, high = lo - band / 2, lo + band / 2
    if bounds and low < bounds[0] <= lo:  # e.g. every F1 is 0: show 0 near the bottom, not mid-axis
        low, high = lo - band * 0.1, lo + band * 0.9
    elif bounds and high > bounds[1] >= lo:
        low, high = lo - band * 0.9, lo + band * 0.1
    return low, high


def _note(ax: Any, text: str | None, below: float = -0.13) -> None:
    """`text` under the panel (never over a data point): sample size, models, aggregation."""
    if text:
        ax.annotate(text, xy=(0.0, below), xycoords="axes fraction", annotation_clip=False, **NOTE_STYLE)


def _no_data(ax: Any) -> None:
    ax.text(0.5, 0.5, "no data", transform=ax.transAxes, ha="center", va="center", fontsize=12, color="0.4")


def _fmt(y: float) -> str:
    return f"{y:.3g}" if abs(y) < 1 else f"{y:.1f}"


def line_plot(
    series: Mapping[str, Mapping[float, float | None]],
    path: str | Path,
    *,
    title: str,
    x_label: str,
    y_label: str,
    log2_x: bool = False,
    dashed: Sequence[str] = (),
    note: str | None = None,
    y_bounds: tuple[float, float] | None = None,
    label_points: bool = True,
) -> Path:
    """One line per series (x -> y; null y values are left out); saved as PNG at `path`.

    `note` (sample size, model, aggregation) is written in the panel; the y axis holds every
    point (`fit_limits`); solid series get their values written beside the points.
    """
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.2, 4.6))
    ax = fig.add_subplot()
    xs_all: set[float] = set()
    ys_all: list[float] = []
    for name, points in series.items():
        pts = sorted((x, float(y)) for x, y in points.items() if _finite(y))  # type: ignore[arg-type]
        if not pts:
            continue
        xs_all.update(x for x, _ in pts)
        ys_all += [y for _, y in pts]
        is_dashed = name in dashed
        (line,) = ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o",
                          linestyle="--" if is_dashed else "-", linewidth=1.0 if is_dashed else 2.0,
                          markersize=4 if is_dashed else 6, label=name)
        if label_points and not is_dashed:
            for x, y in pts:
                ax.annotate(_fmt(y), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7,
                            color=line.get_color())
    if log2_x:
        ax.set_xscale("log", base=2)
    if xs_all:
        ax.set_xticks(sorted(xs_all), [f"{x:g}" for x in sorted(xs_all)])
        lo, hi = min(xs_all), max(xs_all)
        if lo == hi:
            ax.set_xlim(lo / 2, hi * 2) if log2_x else ax.set_xlim(lo - 1, hi + 1)
        elif log2_x:
            ax.set_xlim(lo / 2 ** 0.25, hi * 2 ** 0.25)
        else:
            pad = (hi - lo) * 0.05
            ax.set_xlim(lo - pad, hi + pad)
    ax.set_ylim(*fit_limits(ys_all, y_bounds))
    if not ys_all:
        _no_data(ax)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(x_label)
    ax.set_ylabel(y_label)
    ax.grid(True, alpha=0.3)
    _note(ax, note)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    return _save(fig, Path(path))


def bar_plot(
    groups: Mapping[str, Mapping[str, float | None]],
    path: str | Path,
    *,
    title: str,
    y_label: str,
    note: str | None = None,
    y_bounds: tuple[float, float] | None = None,
) -> Path:
    """Grouped bars: one group per category (inner keys), one bar per series (outer keys).

    Each bar carries its value; an undefined value draws no bar and says "n/a" (never a bar of 0).
    """
    from matplotlib.figure import Figure

    categories: list[str] = []
    for values in groups.values():
        categories += [c for c in values if c not in categories]
    fig = Figure(figsize=(max(7.2, 0.75 * len(categories) * max(1, len(groups))), 4.8))
    ax = fig.add_subplot()
    width = 0.8 / max(1, len(groups))
    ys_all: list[float] = []
    for g, (name, values) in enumerate(groups.items()):
        xs = [i + g * width for i in range(len(categories))]
        ys = [values.get(c) for c in categories]
        defined = [(x, float(y)) for x, y in zip(xs, ys, strict=True) if _finite(y)]  # type: ignore[arg-type]
        ys_all += [y for _, y in defined]
        bars = ax.bar([x for x, _ in defined], [y for _, y in defined], width=width, label=name)
        for bar, (_, y) in zip(bars, defined, strict=True):
            ax.annotate(_fmt(y), (bar.get_x() + bar.get_width() / 2, y), textcoords="offset points",
                        xytext=(0, 2), ha="center", fontsize=6, rotation=90)
        for x, y in zip(xs, ys, strict=True):
            if not _finite(y):
                ax.annotate("n/a", (x, 0), textcoords="offset points", xytext=(0, 2), ha="center",
                            fontsize=6, rotation=90, color="0.4")
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(categories))], categories, rotation=35, ha="right")
    low, high = fit_limits([0.0, *ys_all], y_bounds)  # bars start at 0
    ax.set_ylim(low, high + 0.12 * (high - low))  # room for the value labels
    if not ys_all:
        _no_data(ax)
    ax.set_title(title, fontsize=10)
    ax.set_ylabel(y_label)
    ax.grid(True, axis="y", alpha=0.3)
    _note(ax, note, below=-0.36)  # under the rotated category labels
    if groups:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    return _save(fig, Path(path))


BON_DASHED = ("pass@1", "pass@n")  # references that do not use the PRM


def bon_curve_plot(
    rows: Sequence[Mapping[str, Any]],
    path: str | Path,
    *,
    methods: Sequence[str],
    problems: Mapping[str, int],
    prm_model: str,
    aggregation: str,
    repeats: int,
) -> Path:
    """Best-of-N accuracy against N: one panel per dataset (its problem count in the panel title),
    one line per method; the figure title names the PRM and the solution-score aggregation."""
    from matplotlib.figure import Figure

    datasets = list(dict.fromkeys(r["dataset"] for r in rows)) or list(problems) or ["(none)"]
    cols = min(3, len(datasets))
    nrows = -(-len(datasets) // cols)
    fig = Figure(figsize=(4.8 * cols, 3.8 * nrows + 0.9))
    subsets = f"mean over {repeats} random subsets of size N" if repeats else "the first N candidates"
    fig.suptitle(f"Best-of-N accuracy vs N — PRM {prm_model}, solution score = {aggregation} of its step "
                 f"rewards\n{subsets}; prm = PRM's best, prm_vote = PRM-weighted vote, maj = majority, "
                 "pass@1 / pass@n (dashed) without the PRM", fontsize=9)
    for k, dataset in enumerate(datasets):
        ax = fig.add_subplot(nrows, cols, k + 1)
        ys_all: list[float] = []
        xs_all: set[int] = set()
        for method in methods:
            pts = sorted((r["n"], float(r["accuracy"])) for r in rows
                         if r["dataset"] == dataset and r["method"] == method and _finite(r["accuracy"]))
            if not pts:
                continue
            xs_all.update(x for x, _ in pts)
            ys_all += [y for _, y in pts]
            dashed = method in BON_DASHED
            ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", label=method, markersize=4,
                    linestyle="--" if dashed else "-", linewidth=1.0 if dashed else 1.8)
            if method in ("prm", "maj"):
                x, y = pts[-1]
                ax.annotate(f"{y:.3f}", (x, y), textcoords="offset points", xytext=(4, -3 if method == "maj" else 3),
                            fontsize=7)
        ax.set_xscale("log", base=2)
        if xs_all:
            ticks = sorted(xs_all)
            ax.set_xticks(ticks, [str(x) for x in ticks])
            ax.set_xlim(ticks[0] / 2 ** 0.3, ticks[-1] * 2 ** 0.3) if len(ticks) > 1 else \
                ax.set_xlim(ticks[0] / 2, ticks[0] * 2)
        else:
            _no_data(ax)
        ax.set_ylim(*fit_limits(ys_all, (0.0, 1.0)))
        n = problems.get(dataset)
        ax.set_title(f"{dataset} (n = {n} problem{'s' if n != 1 else ''})" if n is not None else dataset,
                     fontsize=9)
        ax.set_xlabel("N (candidates per problem)")
        ax.set_ylabel("accuracy (share of problems solved)")
        ax.grid(True, alpha=0.3)
        if k == 0 and ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
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
