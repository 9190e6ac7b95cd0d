"""The report's first screen and figures in words: random-weight notice, a summary sentence per
comparison, captions, the chance line, and why a requested point is missing."""

from __future__ import annotations

import dataclasses
import html
from pathlib import Path

import numpy as np
import pytest
from matplotlib.figure import Figure

from embedkit.report import build_report, plots
from embedkit.results import ResultsDir

from .test_report import _fewshot_record, _write


def _page(tmp_path: Path) -> str:
    return (tmp_path / "report" / "report.html").read_text()


def test_first_screen_warns_of_random_weights_and_summarises_in_words(tmp_path: Path) -> None:
    results = ResultsDir(tmp_path / "results")
    _write(results, "test/tiny-a", 224, "linear", noise=1.2)
    _write(results, "test/tiny-a", 512, "linear", noise=0.3)
    built = build_report(tmp_path / "results", tmp_path / "report", n_boot=200)
    page = _page(tmp_path)
    first = page.index("<h2>")  # before any table
    assert page.index("Random weights") < first
    assert "test/tiny-a" in page[: page.index("<table")]
    [c] = built.comparisons
    sentence = html.escape(
        f"toy: {c.a} is better than {c.b} by {abs(c.delta):.3f} "
        f"({c.metric} {c.delta:+.3f}, 95% CI [{c.low:+.3f}, {c.high:+.3f}], "
        f"holm-corrected p = {c.p_adjusted:.3g})."
    )
    assert sentence in page
    assert page.index(sentence) < page.index("<table")


def test_no_random_weight_notice_for_real_models(tmp_path: Path) -> None:
    results = ResultsDir(tmp_path / "results")
    _write(results, "m/a", 224, "linear", noise=1.2)
    build_report(tmp_path / "results", tmp_path / "report", n_boot=50)
    assert "Random weights" not in _page(tmp_path)


def test_figures_are_captioned_in_words_and_say_why_a_point_is_missing(tmp_path: Path) -> None:
    results = ResultsDir(tmp_path / "results")
    _write(results, "m/a", 224, "linear", noise=1.2)
    _write(results, "m/a", 512, "linear", noise=0.3)
    record = dataclasses.replace(
        _fewshot_record("m/a", (1, 2, 4)),
        params={"shots": [1, 2, 4, 8], "draws": 5},
        notes=["8-shot skipped: label 'C' has 6 positives in train, fewer than 8"],
    )
    results.write(record, None)
    build_report(tmp_path / "results", tmp_path / "report", n_boot=50)
    page = _page(tmp_path)
    assert "<figcaption>auroc_vs_resolution" not in page
    assert "per_label_delta_" not in page.split("<h2>Figures</h2>")[1]
    fewshot = plots.caption_of(tmp_path / "report" / "fewshot_toy.png")
    assert "against shots" in fewshot and "chance (0.5)" in fewshot
    assert "Missing: 8 shots: label 'C' has 6 positives in train, fewer than 8" in fewshot
    assert "8 shots: label" in page.split("<h2>Figures</h2>")[0]  # on the first screen too
    assert "toy: test macro AUROC against input resolution" in page


@pytest.mark.parametrize("plot", ["auroc_vs_resolution", "curves"])
def test_auroc_figures_draw_the_chance_line(
    plot: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from embedkit.report.tables import summary_rows

    results = ResultsDir(tmp_path / "results")
    _write(results, "m/a", 224, "linear", noise=1.2)
    results.write(_fewshot_record("m/a", (1, 2)), None)
    records = results.records()
    figures: list[Figure] = []
    real = plots.save

    def keep(fig: Figure, path: Path, caption: str = "") -> Path:
        figures.append(fig)
        return real(fig, path, caption)

    monkeypatch.setattr(plots, "save", keep)
    fn = {"auroc_vs_resolution": plots.auroc_vs_resolution, "curves": plots.curves}[plot]
    fn(summary_rows(records), records, tmp_path)
    assert figures
    for fig in figures:
        lines = fig.axes[0].get_lines()
        assert any(
            np.asarray(line.get_ydata()).tolist() == [0.5, 0.5]
            and line.get_label() == "chance (0.5)"
            for line in lines
        )
