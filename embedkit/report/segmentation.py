"""The report's segmentation part: Dice / IoU tables, the paired Dice test, overlay figures.

Records with ``task = "segmentation"`` (frozen probe or finetuned; the contract is in
:mod:`embedkit.results.segmentation`) get

- a table per run: Dice and IoU (and HD95 for volumes) per class and their mean over classes,
  each with its 95% bootstrap CI, in ``segmentation.md`` / ``segmentation.csv`` and the page;
- paired comparisons of the per-image mean Dice between runs on the same test images
  (:func:`embedkit.report.compare.paired_dice_test`: a sign-flip permutation test of the
  mean per-image difference and the paired bootstrap percentile CI of that mean),
  Holm-corrected together with the
  classification comparisons (:func:`embedkit.report.compare.compare_records`);
- one sentence per run on the first screen, and a figure per run with its best and worst test
  cases (image, ground truth, prediction).
"""

from __future__ import annotations

import csv
import io
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.patches import Patch

from embedkit.report.plots import register_plot, save  # first: it selects the Agg backend
from embedkit.report.tables import SummaryRow
from embedkit.results import ResultRecord
from embedkit.results.segmentation import is_segmentation, load_overlays

if TYPE_CHECKING:
    from rich.table import Table

__all__ = [
    "headline_sentences",
    "overlay_figures",
    "render_segmentation",
    "segmentation_csv",
    "segmentation_markdown",
    "segmentation_tables",
]

#: Per-class metrics a table shows, in order, when the record has them.
_METRICS = (("dice", "Dice"), ("iou", "IoU"), ("hd95", "HD95"))


def _ci(m: Mapping[str, Any] | None) -> str:
    if not isinstance(m, Mapping) or m.get("point") is None:
        return "-"
    low, high = m.get("low"), m.get("high")
    if low is None or high is None:
        return f"{m['point']:.3f}"
    return f"{m['point']:.3f} [{low:.3f}, {high:.3f}]"


def _title(r: ResultRecord) -> str:
    return f"{r.dataset} · {r.model} · {r.resolution}px · {r.kind}"


def _metric_names(r: ResultRecord) -> list[tuple[str, str]]:
    return [(key, name) for key, name in _METRICS if key in r.metrics]


def segmentation_tables(
    records: Sequence[ResultRecord],
) -> list[tuple[ResultRecord, list[str], list[list[str]]]]:
    """Per segmentation record: its header and rows (each class, then the mean over classes)."""
    out = []
    for r in sorted(filter(is_segmentation, records),
                    key=lambda r: (r.dataset, r.model, r.kind, r.resolution)):  # fmt: skip
        names = _metric_names(r)
        header = ["class", *(f"{name} [95% CI]" for _, name in names)]
        rows = [[str(row["label"]), *(_ci(row.get(key)) for key, _ in names)]
                for row in r.per_label]  # fmt: skip
        rows.append(["mean over classes", *(_ci(r.metrics.get(key)) for key, _ in names)])
        out.append((r, header, rows))
    return out


def render_segmentation(record: ResultRecord) -> Table:
    """One segmentation record as a terminal table (the commands print it after a run)."""
    from rich.table import Table

    chosen = ", ".join(f"{k}={v:g}" for k, v in record.selected.items())
    table = Table(title=_title(record) + (f" · {chosen}" if chosen else ""), title_justify="left")
    for _, header, rows in segmentation_tables([record]):
        for column in header:
            table.add_column(column)
        for row in rows:
            table.add_row(*row)
    return table


def segmentation_markdown(records: Sequence[ResultRecord]) -> str:
    parts = []
    for r, header, rows in segmentation_tables(records):
        lines = [f"#### {_title(r)}", "", "| " + " | ".join(header) + " |",
                 "|" + "---|" * len(header)]  # fmt: skip
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        parts.append("\n".join(lines) + "\n")
    return "\n".join(parts)


def segmentation_csv(records: Sequence[ResultRecord]) -> str:
    """One line per run and class (and ``mean`` per run): point and CI of each metric."""
    buf = io.StringIO()
    fields = ["dataset", "model", "resolution", "method", "class"]
    for key, _ in _METRICS:
        fields += [key, f"{key}_low", f"{key}_high"]
    writer = csv.DictWriter(buf, fieldnames=fields)
    writer.writeheader()
    for r in filter(is_segmentation, records):
        entries = [(str(row["label"]), row) for row in r.per_label] + [("mean", r.metrics)]
        for name, values in entries:
            line: dict[str, object] = {"dataset": r.dataset, "model": r.model,
                                       "resolution": r.resolution, "method": r.kind,
                                       "class": name}  # fmt: skip
            for key, _ in _METRICS:
                m = values.get(key)
                if isinstance(m, Mapping):
                    line |= {key: m.get("point"), f"{key}_low": m.get("low"),
                             f"{key}_high": m.get("high")}  # fmt: skip
            writer.writerow(line)
    return buf.getvalue()


def headline_sentences(records: Sequence[ResultRecord]) -> list[str]:
    """One sentence per segmentation run: mean Dice with its CI, the best and worst class."""
    out = []
    for r, _, _ in segmentation_tables(records):
        dice = r.metrics["dice"]
        classes = [(row["label"], row["dice"]["point"]) for row in r.per_label]
        volumes = "hd95" in r.metrics  # scored per volume
        n_scored = r.extra.get("n_scored")
        scored = n_scored.get("test") if isinstance(n_scored, Mapping) else None
        if scored is None and not volumes:
            scored = r.n.get("test")
        count = f"{scored} " if scored is not None else ""
        text = (
            f"{r.dataset}: {r.model} at {r.resolution}px ({r.kind}) segments with mean Dice "
            f"{dice['point']:.3f} (95% CI {dice['low']:.3f} to {dice['high']:.3f}) over "
            f"{count}test {'volumes' if volumes else 'images'}"
        )
        if len(classes) > 1:
            best, worst = max(classes, key=lambda c: c[1]), min(classes, key=lambda c: c[1])
            text += (
                f"; best class {best[0]} (Dice {best[1]:.3f}), worst {worst[0]} "
                f"(Dice {worst[1]:.3f})"
            )
        out.append(text + ".")
    return out


def _draw_labels(ax: Any, image: np.ndarray, labels: np.ndarray) -> None:
    ax.imshow(image, cmap="gray", vmin=0, vmax=1)
    shown = np.ma.masked_where(labels == 0, labels)  # class k: colour k - 1 of tab10
    ax.imshow(shown, cmap="tab10", vmin=0.5, vmax=10.5, alpha=0.5, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])


@register_plot("segmentation_overlays", files=True)
def overlay_figures(
    rows: Sequence[SummaryRow],
    records: Sequence[ResultRecord],
    out: Path,
    files: Mapping[str, Path],
) -> list[Path]:
    """Per segmentation record with overlays: a row per example case (best first), columns
    image, ground truth and prediction over the image, coloured by class."""
    paths = []
    for r in records:
        source = files.get(r.record_id)
        overlays = load_overlays(source, r) if is_segmentation(r) and source else None
        if overlays is None or len(overlays.ids) == 0:
            continue
        k = len(overlays.ids)
        fig, axes = plt.subplots(k, 3, figsize=(7.5, 2.5 * k + 0.6), squeeze=False)
        for i in range(k):
            panels = (("image", None), ("ground truth", overlays.truth[i]),
                      ("prediction", overlays.pred[i]))  # fmt: skip
            for j, (title, labels) in enumerate(panels):
                ax = axes[i, j]
                if labels is None:
                    ax.imshow(overlays.image[i], cmap="gray", vmin=0, vmax=1)
                    ax.set_xticks([])
                    ax.set_yticks([])
                    ax.set_ylabel(f"{overlays.ids[i]}\nDice {overlays.mean_dice[i]:.3f}",
                                  fontsize=8)  # fmt: skip
                else:
                    _draw_labels(ax, overlays.image[i], labels)
                if i == 0:
                    ax.set_title(title, fontsize=9)
        fig.suptitle(_title(r), fontsize=9)
        colours = plt.get_cmap("tab10")
        handles = [Patch(color=colours(min(n, 9)), alpha=0.5, label=name)
                   for n, name in enumerate(r.labels)]  # fmt: skip
        fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 5), fontsize=8)
        fig.subplots_adjust(bottom=0.5 / (2.5 * k + 0.6))
        classes = ", ".join(f"{n + 1}: {name}" for n, name in enumerate(r.labels))
        caption = (
            f"{_title(r)}: {k} example test images, those with the highest and those with the "
            "lowest mean Dice over classes (best at the top, its Dice beside each). Each row "
            "shows the image, the ground-truth label map over it and the predicted label map "
            f"over it, one colour per class as the legend shows ({classes}); uncoloured pixels "
            "are background."
        )
        safe = f"overlays_{r.dataset}_{r.model}_{r.resolution}_{r.kind}".replace("/", "--")
        paths.append(save(fig, out / f"{safe}.png", caption))
    return paths
