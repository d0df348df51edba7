"""Figures readable offline: PNG DVC plots only, each with a title, its sample size, and axes that hold the data."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from components import plots

ROOT = Path(__file__).resolve().parents[1]
PNG = b"\x89PNG\r\n\x1a\n"


def test_only_images_are_dvc_plots_and_the_html_folder_is_ignored() -> None:
    """`dvc plots show` renders images offline; CSV plots need Vega from a CDN, so none are declared."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    declared = [next(iter(p)) if isinstance(p, dict) else p for s in stages.values() for p in s.get("plots", [])]
    assert declared and all(p.endswith(".png") for p in declared), declared
    outs = {next(iter(o)) if isinstance(o, dict) else o for s in stages.values() for o in s.get("outs", [])}
    assert {"plots/scaling.csv", "plots/threshold.csv", "plots/bon_curve.csv"} <= outs
    assert "/dvc_plots/" in (ROOT / ".gitignore").read_text().splitlines()


@pytest.mark.parametrize(("values", "bounds"), [
    ([0.0, 0.0, 0.0], (0.0, 100.0)),  # every F1 zero: 0 near the bottom, not on the edge
    ([100.0], (0.0, 100.0)),
    ([11.0, 16.3, 6.4], (0.0, 100.0)),
    ([0.133, 0.733, 0.967], (0.0, 1.0)),
    ([-3.0, 5.0], None),
    ([2.5], None),
])
def test_limits_hold_every_value_with_a_margin(values: list[float], bounds: tuple[float, float] | None) -> None:
    low, high = plots.fit_limits(values, bounds)
    assert low < min(values) and high > max(values)


def test_flat_zero_series_sits_at_the_bottom() -> None:
    low, high = plots.fit_limits([0.0, 0.0], (0.0, 100.0))
    assert -2 < low < 0 < 5 < high <= 10


def test_figures_say_what_they_show(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Titles, the note with n, value labels and n/a for undefined bars all end up in the figure."""
    from matplotlib.figure import Figure

    drawn: list[Figure] = []
    real_save = plots._save

    def keep(fig: Figure, path: Path) -> Path:
        drawn.append(fig)
        return real_save(fig, path)

    monkeypatch.setattr(plots, "_save", keep)

    def texts(fig: Figure) -> str:
        parts = [fig._suptitle.get_text()] if fig._suptitle else []
        for ax in fig.axes:
            parts += [ax.get_title(), ax.get_xlabel(), ax.get_ylabel(), *(t.get_text() for t in ax.texts)]
            legend = ax.get_legend()
            if legend:
                parts += [t.get_text() for t in legend.get_texts()]
        return "\n".join(parts)

    p = plots.line_plot({"dpo avg": {1: 16.7, 2: 6.4, 4: 16.3}, "base avg": {1: 0.0, 2: 0.0, 4: 0.0}},
                        tmp_path / "a.png", title="F1 vs K — models base, dpo", x_label="K", y_label="F1",
                        log2_x=True, note="n = 60 solutions", y_bounds=(0, 100))
    assert p.read_bytes()[:8] == PNG
    text = texts(drawn[-1])
    assert "models base, dpo" in text and "n = 60 solutions" in text and "16.7" in text
    low, high = drawn[-1].axes[0].get_ylim()
    assert low < 0.0 and high > 16.7

    plots.bar_plot({"dpo": {"overall (n=18)": 0.52, "simplicity": None}}, tmp_path / "b.png",
                   title="PRMScore", y_label="PRMScore", note="n = 18 items", y_bounds=(0, 1))
    text = texts(drawn[-1])
    assert "n/a" in text and "0.52" in text and "n = 18 items" in text

    plots.line_plot({}, tmp_path / "c.png", title="nothing", x_label="K", y_label="F1")
    assert "no data" in texts(drawn[-1])

    rows = [{"dataset": "arithmetic", "n": n, "method": m, "accuracy": a}
            for n, m, a in [(1, "prm", 0.3), (8, "prm", 0.133), (1, "maj", 0.3), (8, "maj", 0.733),
                            (1, "pass@n", 0.3), (8, "pass@n", 0.967)]]
    plots.bon_curve_plot(rows + [{**r, "dataset": "math500"} for r in rows[:2]], tmp_path / "d.png",
                         methods=("pass@1", "maj", "prm", "prm_vote", "pass@n"),
                         problems={"arithmetic": 30, "math500": 1}, prm_model="dpo", aggregation="min", repeats=4)
    text = texts(drawn[-1])
    assert "PRM dpo" in text and "min of its step rewards" in text
    assert "arithmetic (n = 30 problems)" in text and "math500 (n = 1 problem)" in text
    for ax in drawn[-1].axes:
        low, high = ax.get_ylim()
        assert low < 0.133 and high > 0.3
