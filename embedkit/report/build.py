"""`embedkit report`: every output of a comparison report, from result records alone.

Writes ``summary.md`` / ``summary.csv`` (headline metric with 95% CI per dataset x model x
resolution x method), ``per_label.md`` / ``per_label.csv``, ``comparisons.md`` /
``comparisons.csv`` (paired permutation p-values with multiple-comparison correction and paired
bootstrap CIs of the differences; ``docs/statistics.md``), PNG plots,
and ``report.html``: one self-contained page (plots embedded) that opens offline.
"""

from __future__ import annotations

import base64
import html
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from embedkit.errors import CacheNotFoundError
from embedkit.eval.bootstrap import Correction
from embedkit.report import plots
from embedkit.report import segmentation as seg
from embedkit.report.compare import (
    CI_NAME,
    DICE_TEST_NAME,
    TEST_NAME,
    Comparison,
    PairChoice,
    RunPair,
    compare_records,
    comparisons_markdown,
)
from embedkit.report.tables import (
    SEGMENTATION_HEADLINE,
    SummaryRow,
    per_label_markdown,
    summary_rows,
    to_csv,
    to_markdown,
)
from embedkit.results import ResultRecord, load_record
from embedkit.results.consistency import check_records
from embedkit.results.segmentation import is_segmentation


@dataclass
class ReportFiles:
    out: Path
    summary: list[SummaryRow]
    comparisons: list[Comparison]
    files: list[Path] = field(default_factory=list)

    @property
    def html(self) -> Path:
        return self.out / "report.html"


def _records(results: Path) -> list[tuple[ResultRecord, Path]]:
    paths = sorted(p for p in results.rglob("*.json") if not p.name.startswith("."))
    return [(load_record(p), p) for p in paths]


def _write(path: Path, text: str) -> Path:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


def _per_label_rows(records: list[ResultRecord]) -> list[dict[str, object]]:
    rows: list[dict[str, object]] = []
    for r in records:
        if is_segmentation(r):  # segmentation.csv holds their per-class rows
            continue
        for row in r.per_label:
            rows.append(
                {
                    "dataset": r.dataset,
                    "model": r.model,
                    "resolution": r.resolution,
                    "method": r.kind,
                    **row,
                }
            )
    return rows


#: Registry namespace of the tiny random-weight test encoders.
TEST_MODEL_PREFIX = "test/"


def random_weight_models(records: Sequence[ResultRecord]) -> list[str]:
    """Models of ``records`` that are tiny test encoders with random weights."""
    return sorted({r.model for r in records if r.model.startswith(TEST_MODEL_PREFIX)})


def findings(comparisons: Sequence[Comparison], correction: str) -> list[str]:
    """One sentence per paired comparison: which run is better, by how much, with its 95% CI
    and the corrected p-value."""
    out = []
    for c in comparisons:
        metric = "mean Dice" if c.metric == SEGMENTATION_HEADLINE else c.metric
        stats = (
            f"{metric} {c.delta:+.3f}, 95% CI [{c.low:+.3f}, {c.high:+.3f}], "
            f"{correction}-corrected p = {c.p_adjusted:.3g}"
        )
        if c.low <= 0 <= c.high:
            out.append(f"{c.dataset}: no clear difference between {c.a} and {c.b} ({stats}).")
        else:
            better, worse = (c.a, c.b) if c.delta > 0 else (c.b, c.a)
            out.append(
                f"{c.dataset}: {better} is better than {worse} by {abs(c.delta):.3f} ({stats})."
            )
    return out


def missing_points(records: Sequence[ResultRecord]) -> list[str]:
    """Requested curve points (e.g. 8 shots) that a record does not hold, and why."""
    return [
        f"{r.dataset} · {r.model} · {r.resolution}px · {r.kind}: {m}"
        for r in records
        for m in plots.missing_points(r)
    ]


def _first_screen(records: Sequence[ResultRecord], comparisons: Sequence[Comparison],
                  correction: str) -> str:  # fmt: skip
    parts = []
    random = random_weight_models(records)
    if random:
        parts.append(
            '<p class="warn"><strong>Random weights:</strong> '
            + html.escape(", ".join(random))
            + " are tiny test encoders with random weights. Their results exercise the pipeline "
            "and mean nothing about any real model.</p>"
        )
    sentences = findings(comparisons, correction) or [
        "No paired comparison: the records hold no two runs on the same test images."
    ]
    sentences += seg.headline_sentences(records)
    parts.append("<h2>Summary</h2><ul>" + "".join(
        f"<li>{html.escape(t)}</li>" for t in sentences) + "</ul>")  # fmt: skip
    missing = missing_points(records)
    if missing:
        parts.append("<p>Requested points not in the results:</p><ul>" + "".join(
            f"<li>{html.escape(t)}</li>" for t in missing) + "</ul>")  # fmt: skip
    return "\n".join(parts)


def _html(
    title: str, sections: list[tuple[str, str]], images: list[Path], first_screen: str = ""
) -> str:
    figs = "\n".join(
        f'<figure><img alt="{html.escape(caption)}" src="data:image/png;base64,'
        f'{base64.b64encode(p.read_bytes()).decode()}"/><figcaption>{html.escape(caption)}'
        "</figcaption></figure>"
        for p in images
        for caption in [plots.caption_of(p) or p.stem.replace("_", " ")]
    )
    body = "\n".join(f"<h2>{html.escape(h)}</h2>\n{content}" for h, content in sections)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2rem; max-width: 1200px; }}
table {{ border-collapse: collapse; margin: 1rem 0; font-size: 0.85rem; }}
th, td {{ border: 1px solid #ccc; padding: 0.25rem 0.5rem; text-align: left; }}
th {{ background: #f3f3f3; }}
figure {{ display: inline-block; margin: 0.5rem; max-width: 560px; vertical-align: top; }}
img {{ max-width: 560px; }}
.warn {{ background: #fff3cd; border: 1px solid #e0c060; padding: 0.5rem; }}
</style></head><body>
<h1>{html.escape(title)}</h1>
{first_screen}
{body}
<h2>Figures</h2>
{figs}
</body></html>
"""


def _table_html(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _ci(point: float, low: float | None, high: float | None) -> str:
    return f"{point:.3f}" if low is None or high is None else f"{point:.3f} [{low:.3f}, {high:.3f}]"


def _rates(row: dict[str, object]) -> str:
    sens, spec = row.get("sensitivity"), row.get("specificity")
    if not isinstance(sens, float) or not isinstance(spec, float):
        return "-"
    return f"{sens:.3f} / {spec:.3f}"


def build_report(
    results: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    correction: Correction = "holm",
    n_boot: int = 1000,
    pairs: Sequence[PairChoice | RunPair] | None = None,
) -> ReportFiles:
    """Read every record under ``results`` and write the report files to ``out``.

    Records of one dataset name made from different manifests are refused
    (:class:`~embedkit.results.consistency.MixedResultsError`), never mixed in one table.
    ``pairs`` limits the paired comparisons to chosen ones (default: every comparable pair)."""
    root = Path(results)
    found = _records(root)
    if not found:
        raise CacheNotFoundError(
            f"no result records under {root}; run `embedkit probe ...` first (or pass --results)"
        )
    check_records(found, where=str(root))
    records = [r for r, _ in found]
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = summary_rows(records)
    comparisons = compare_records(found, n_boot=n_boot, correction=correction, pairs=pairs)
    report = ReportFiles(out_dir, rows, comparisons)
    report.files += [
        _write(out_dir / "summary.md", to_markdown(rows)),
        _write(out_dir / "summary.csv", to_csv(rows)),
        _write(
            out_dir / "per_label.md",
            "\n".join(
                per_label_markdown(r) for r in records if r.per_label and not is_segmentation(r)
            ),
        ),
        _write(out_dir / "per_label.csv", to_csv_dicts(_per_label_rows(records))),
        _write(out_dir / "comparisons.md", comparisons_markdown(comparisons, correction)),
        _write(out_dir / "comparisons.csv", to_csv(comparisons)),
    ]
    segmentation = seg.segmentation_tables(records)
    if segmentation:
        report.files += [
            _write(out_dir / "segmentation.md", seg.segmentation_markdown(records)),
            _write(out_dir / "segmentation.csv", seg.segmentation_csv(records)),
        ]
    images = plots.draw_all(rows, records, out_dir, {r.record_id: p for r, p in found})
    report.files += images
    summary_table = _table_html(
        [
            "dataset",
            "model",
            "res",
            "method",
            "pooling",
            "metric",
            "value [95% CI]",
            "n test",
            "chosen",
        ],
        [
            [
                s.dataset,
                s.model,
                str(s.resolution),
                s.method,
                s.pooling,
                s.metric,
                _ci(s.point, s.low, s.high),
                str(s.n_test),
                s.chosen,
            ]
            for s in rows
        ],
    )
    mixed_metrics = len({c.metric for c in comparisons}) > 1  # name the metric in each row
    tests = TEST_NAME
    if any(c.metric == SEGMENTATION_HEADLINE for c in comparisons):
        tests = f"{TEST_NAME} for AUROC, {DICE_TEST_NAME} for Dice"
    comparison_table = _table_html(
        ["dataset", "axis", "A", "B", "Δ (A − B) [95% CI]", "p", f"p ({correction})"],
        [
            [
                c.dataset,
                c.axis,
                c.a,
                c.b,
                f"{c.metric} " * mixed_metrics + f"{c.delta:+.3f} [{c.low:+.3f}, {c.high:+.3f}]",
                f"{c.p_value:.3g}",
                f"{c.p_adjusted:.3g}",
            ]
            for c in comparisons
        ],
    )
    per_label = "".join(
        f"<h3>{html.escape(f'{r.dataset} · {r.model} · {r.resolution}px · {r.kind}')}</h3>"
        + _table_html(
            [
                "label",
                "AUROC [95% CI]",
                "AP",
                f"sens / spec ({r.operating_point or 'no operating point'})",
                "pos/neg",
            ],
            [
                [
                    row["label"],
                    "undefined"
                    if row["auroc"] is None
                    else _ci(row["auroc"], row["low"], row["high"]),
                    "-" if row["ap"] is None else f"{row['ap']:.3f}",
                    _rates(row),
                    f"{row['n_pos']}/{row['n_neg']}" + (" rare" if row.get("rare") else ""),
                ]
                for row in r.per_label
            ],
        )
        for r in records
        if r.per_label and not is_segmentation(r)
    )
    sections = [
        ("Headline metric per dataset × model × resolution × method", summary_table),
        (
            f"Paired comparisons (p: {tests}, {correction}-adjusted; 95% CI: {CI_NAME})",
            comparison_table,
        ),
        ("Per-label results", per_label),
    ]
    if segmentation:
        sections.append(
            (
                "Segmentation: Dice and IoU per class (test, 95% bootstrap CI over images)",
                "".join(
                    f"<h3>{html.escape(f'{r.dataset} · {r.model} · {r.resolution}px · {r.kind}')}"
                    f"</h3>" + _table_html(header, body)
                    for r, header, body in segmentation
                ),
            )
        )
    page = _html(
        "embedkit comparison report",
        sections,
        images,
        _first_screen(records, comparisons, correction),
    )
    report.files.append(_write(out_dir / "report.html", page))
    return report


def to_csv_dicts(rows: list[dict[str, object]]) -> str:
    import csv
    import io

    buf = io.StringIO()
    if rows:
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return buf.getvalue()
