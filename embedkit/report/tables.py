"""The headline table: one row per result record (dataset x model x resolution x method)."""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from embedkit.results import ResultRecord
from embedkit.results.segmentation import is_segmentation

#: Headline metrics that are AUROCs (plotted against resolution with the chance line).
AUROC_METRICS = frozenset({"macro_auroc", "ovr_macro_auroc"})
#: The headline metric of a segmentation record.
SEGMENTATION_HEADLINE = "mean_dice"


@dataclass(frozen=True, slots=True)
class SummaryRow:
    dataset: str
    model: str
    resolution: int
    method: str  # probe kind or finetuning method
    pooling: str
    metric: str
    point: float
    low: float | None
    high: float | None
    n_test: int
    chosen: str
    record_id: str
    curve: str | None = None  # the record's declaration: its headline is one point of a curve


def curve_x(key: str) -> int:
    """The x value of a curve point's metrics key (``"16-shot"`` -> 16)."""
    return int(key.split("-")[0])


def headline(record: ResultRecord) -> tuple[str, float, float | None, float | None]:
    """(metric name, point, CI low, CI high) of the record's main metric.

    Multi-label: macro AUROC; multi-class: one-vs-rest macro AUROC; a record that declares a
    curve (few-shot): the largest point's mean (over draws) with its 95% t-interval;
    segmentation: the mean Dice over classes and images.
    """
    metrics = record.metrics
    if is_segmentation(record):  # mean over classes of the per-image Dice
        m = metrics["dice"]
        return SEGMENTATION_HEADLINE, m["point"], m.get("low"), m.get("high")
    if record.curve is not None:
        last = max(metrics, key=curve_x)
        name = "macro_auroc" if "macro_auroc" in metrics[last] else "ovr_macro_auroc"
        m = metrics[last][name]
        return f"{last} {name}", m["mean"], m.get("ci_low"), m.get("ci_high")
    name = "macro_auroc" if "macro_auroc" in metrics else "ovr_macro_auroc"
    m = metrics[name]
    return name, m["point"], m["low"], m["high"]


def summary_rows(records: Sequence[ResultRecord]) -> list[SummaryRow]:
    rows = []
    for r in records:
        name, point, low, high = headline(r)
        chosen = ", ".join(f"{k}={v:g}" for k, v in r.selected.items())
        rows.append(
            SummaryRow(
                r.dataset,
                r.model,
                r.resolution,
                r.kind,
                r.pooling,
                name,
                point,
                low,
                high,
                r.n.get("test", 0),
                chosen,
                r.record_id,
                r.curve,
            )
        )
    return sorted(rows, key=lambda s: (s.dataset, s.model, s.method, s.resolution))


def _ci(point: float, low: float | None, high: float | None) -> str:
    if low is None or high is None:
        return f"{point:.3f}"
    return f"{point:.3f} [{low:.3f}, {high:.3f}]"


def to_markdown(rows: Sequence[SummaryRow]) -> str:
    head = (
        "| dataset | model | res | method | pooling | metric | value [95% CI] | n test | chosen |"
    )
    lines = [head, "|" + "---|" * 9]
    for s in rows:
        lines.append(
            f"| {s.dataset} | {s.model} | {s.resolution} | {s.method} | {s.pooling} | {s.metric} "
            f"| {_ci(s.point, s.low, s.high)} | {s.n_test} | {s.chosen} |"
        )
    return "\n".join(lines) + "\n"


def to_csv(rows: Sequence[object]) -> str:
    buf = io.StringIO()
    items = [asdict(r) for r in rows]  # type: ignore[call-overload]
    if items:
        writer = csv.DictWriter(buf, fieldnames=list(items[0]))
        writer.writeheader()
        writer.writerows(items)
    return buf.getvalue()


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def per_label_markdown(record: ResultRecord) -> str:
    """Per-label table of one record; sensitivity / specificity are at the record's operating
    point (``ResultRecord.operating_point``, e.g. Youden on validation); a rare label (fewer than
    20 positives or negatives in test) is marked ``rare``."""
    op = record.operating_point or "no operating point"
    lines = [
        f"#### {record.dataset} · {record.model} · {record.resolution}px · {record.kind}",
        "",
        f"| label | AUROC [95% CI] | AP | sens ({op}) | spec | pos/neg |",
        "|---|---|---|---|---|---|",
    ]
    for row in record.per_label:
        counts = f"{row['n_pos']}/{row['n_neg']}" + (" rare" if row.get("rare") else "")
        if row["auroc"] is None:
            lines.append(f"| {row['label']} | undefined | - | - | - | {counts} |")
            continue
        lines.append(
            f"| {row['label']} | {_ci(row['auroc'], row['low'], row['high'])} | {row['ap']:.3f} "
            f"| {_num(row['sensitivity'])} | {_num(row['specificity'])} | {counts} |"
        )
    return "\n".join(lines) + "\n"
