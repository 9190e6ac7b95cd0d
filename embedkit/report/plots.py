"""Report figures (matplotlib, headless): AUROC vs resolution, per-label deltas, declared curves.

Each figure carries its caption in words in the PNG's ``Description`` text chunk (see
:func:`save` and :func:`caption_of`), so the report page captions it without a side table; a plot
that saves without one is captioned by its file name.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TypeVar

import matplotlib

matplotlib.use("Agg")  # no display: files only
import matplotlib.pyplot as plt
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from embedkit.report.tables import AUROC_METRICS, SummaryRow, curve_x
from embedkit.results import ResultRecord
from embedkit.results.segmentation import is_segmentation

#: (summary rows, records, output folder) -> the PNG files written.
PlotFn = Callable[[Sequence[SummaryRow], Sequence[ResultRecord], Path], list[Path]]
#: The same plus each record's JSON path by record id, for plots that read files saved beside
#: the records (segmentation overlays).
FilesPlotFn = Callable[
    [Sequence[SummaryRow], Sequence[ResultRecord], Path, Mapping[str, Path]], list[Path]
]
_Fn = TypeVar("_Fn", PlotFn, FilesPlotFn)

_PLOTS: dict[str, tuple[bool, Callable[..., list[Path]]]] = {}


def register_plot(name: str, *, files: bool = False) -> Callable[[_Fn], _Fn]:
    """Register a report plot under ``name`` (a second plot of one name is an error); with
    ``files=True`` it is a :data:`FilesPlotFn` (it also gets the records' JSON paths)."""

    def add(fn: _Fn) -> _Fn:
        if name in _PLOTS:
            raise ValueError(f"report plot {name!r} is already registered")
        _PLOTS[name] = (files, fn)
        return fn

    return add


def registered_plots() -> tuple[str, ...]:
    """The names of the registered plots, in the order the report draws them."""
    return tuple(_PLOTS)


def draw_all(
    rows: Sequence[SummaryRow],
    records: Sequence[ResultRecord],
    out: Path,
    files: Mapping[str, Path] | None = None,
) -> list[Path]:
    """Every registered plot of ``rows`` / ``records`` into ``out`` (``files``: each record's
    JSON path by record id)."""
    paths: list[Path] = []
    for wants_files, fn in _PLOTS.values():
        args = (rows, records, out, files or {}) if wants_files else (rows, records, out)
        paths += fn(*args)
    return paths


#: AUROC of a classifier that guesses.
CHANCE_AUROC = 0.5


def save(fig: Figure, path: Path, caption: str = "") -> Path:
    """Write ``fig`` to ``path`` (PNG) with ``caption`` in its ``Description`` text chunk."""
    fig.tight_layout()
    fig.savefig(path, dpi=110, metadata={"Description": caption} if caption else None)
    plt.close(fig)
    return path


def caption_of(path: Path) -> str:
    """The caption :func:`save` stored in ``path``, or "" when there is none."""
    from PIL import Image

    with Image.open(path) as image:
        text = getattr(image, "text", {}) or {}
        return str(text.get("Description", ""))


def chance_line(ax: Axes) -> None:
    """The AUROC of guessing, as a dashed line labelled in the legend."""
    ax.axhline(CHANCE_AUROC, color="grey", linestyle="--", linewidth=0.8, label="chance (0.5)")


def missing_points(record: ResultRecord) -> list[str]:
    """Points of a curve record that were asked for but are not in it, each with the reason
    its notes give (few-shot: ``"8 shots: too few positives of Hernia in train ..."``)."""
    if record.curve is None:
        return []
    asked = record.params.get(record.curve, [])
    have = {curve_x(key) for key in record.metrics}
    out = []
    for x in asked if isinstance(asked, list) else []:
        if x in have:
            continue
        prefix = f"{x}-shot skipped: "
        why = next((n[len(prefix) :] for n in record.notes if n.startswith(prefix)), "")
        out.append(f"{x} {record.curve}: {why or 'not in the record'}")
    return out


@register_plot("auroc_vs_resolution")
def auroc_vs_resolution(
    rows: Sequence[SummaryRow], records: Sequence[ResultRecord], out: Path
) -> list[Path]:
    """One figure per dataset: a line per (model, method) with its 95% CI band."""
    paths = []
    by_dataset: dict[str, dict[tuple[str, str], list[SummaryRow]]] = defaultdict(
        lambda: defaultdict(list)
    )
    for row in rows:
        if row.curve is None and row.metric in AUROC_METRICS:
            by_dataset[row.dataset][(row.model, row.method)].append(row)
    for dataset, series in sorted(by_dataset.items()):
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        for (model, method), points in sorted(series.items()):
            points = sorted(points, key=lambda r: r.resolution)
            res = [p.resolution for p in points]
            ax.plot(res, [p.point for p in points], marker="o", label=f"{model} · {method}")
            lows = [p.low for p in points if p.low is not None]
            highs = [p.high for p in points if p.high is not None]
            if len(lows) == len(highs) == len(points):
                ax.fill_between(res, lows, highs, alpha=0.15)
        chance_line(ax)
        ax.set_xlabel("resolution (px)")
        ax.set_ylabel("macro AUROC (test, 95% CI)")
        ax.set_title(f"{dataset}: AUROC vs resolution")
        ax.legend(fontsize=7)
        caption = (
            f"{dataset}: test macro AUROC against input resolution, one line per model and "
            "method, shaded 95% bootstrap CI; the dashed line is chance (0.5)."
        )
        paths.append(save(fig, out / f"auroc_vs_resolution_{dataset}.png", caption))
    return paths


@register_plot("per_label_deltas")
def per_label_deltas(
    rows: Sequence[SummaryRow], records: Sequence[ResultRecord], out: Path
) -> list[Path]:
    """Per-label AUROC change from the lowest to the highest resolution of each model/method."""
    paths = []
    groups: dict[tuple[str, str, str], list[ResultRecord]] = defaultdict(list)
    for r in records:
        if r.per_label and not is_segmentation(r):
            groups[(r.dataset, r.model, r.kind)].append(r)
    for (dataset, model, kind), runs in sorted(groups.items()):
        if len(runs) < 2:
            continue
        runs.sort(key=lambda r: r.resolution)
        low, high = runs[0], runs[-1]
        lo = {row["label"]: row["auroc"] for row in low.per_label}
        names = [
            row["label"]
            for row in high.per_label
            if row["auroc"] is not None and lo.get(row["label"]) is not None
        ]
        deltas = [
            next(r["auroc"] for r in high.per_label if r["label"] == n) - lo[n] for n in names
        ]
        fig, ax = plt.subplots(figsize=(6.4, 0.35 * len(names) + 1.5))
        ax.barh(names, deltas, color=["tab:green" if d >= 0 else "tab:red" for d in deltas])
        ax.axvline(0, color="black", linewidth=0.8)
        ax.set_xlabel(f"AUROC {high.resolution}px − {low.resolution}px")
        ax.set_title(f"{dataset} · {model} · {kind}", fontsize=9)
        safe = f"{dataset}_{model}_{kind}".replace("/", "--")
        caption = (
            f"{dataset}, {model}, {kind}: change in each label's test AUROC from "
            f"{low.resolution} px to {high.resolution} px (green: higher at {high.resolution} px, "
            "red: lower)."
        )
        paths.append(save(fig, out / f"per_label_delta_{safe}.png", caption))
    return paths


@register_plot("curves")
def curves(rows: Sequence[SummaryRow], records: Sequence[ResultRecord], out: Path) -> list[Path]:
    """One figure per dataset and kind of the records that declare a curve (few-shot: mean test
    AUROC vs shots on a log2 axis), with the 95% CI over draws."""
    groups: dict[tuple[str, str], list[ResultRecord]] = defaultdict(list)
    for r in records:
        if r.curve is not None:
            groups[(r.dataset, r.kind)].append(r)
    paths = []
    for (dataset, kind), group in sorted(groups.items()):
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        for r in sorted(group, key=lambda r: (r.model, r.resolution)):
            points = sorted(r.metrics, key=curve_x)
            key = "macro_auroc" if "macro_auroc" in r.metrics[points[0]] else "ovr_macro_auroc"
            xs = [curve_x(s) for s in points]
            mean = [r.metrics[s][key]["mean"] for s in points]
            ax.plot(xs, mean, marker="o", label=f"{r.model} · {r.resolution}px")
            lows = [r.metrics[s][key]["ci_low"] for s in points]
            highs = [r.metrics[s][key]["ci_high"] for s in points]
            ax.fill_between(xs, lows, highs, alpha=0.15)
        chance_line(ax)
        ax.set_xscale("log", base=2)
        ax.set_xlabel(group[0].curve or "")
        ax.set_ylabel("macro AUROC (test, mean and 95% CI over draws)")
        ax.set_title(f"{dataset}: {kind}")
        ax.legend(fontsize=7)
        missing = sorted({m for r in group for m in missing_points(r)})
        caption = (
            f"{dataset}, {kind}: mean test macro AUROC against {group[0].curve} (log scale), one "
            "line per model and resolution, shaded 95% CI over draws; the dashed line is chance "
            "(0.5)." + (f" Missing: {'; '.join(missing)}." if missing else "")
        )
        paths.append(save(fig, out / f"{kind}_{dataset}.png".replace("/", "--"), caption))
    return paths
