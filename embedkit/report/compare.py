"""Paired comparisons between runs evaluated on the same test images.

Pairs are formed automatically among records of one dataset whose saved test scores cover the
same image ids: the same model and method at two resolutions (e.g. 512 vs 224), two models at
the same resolution and method, and two methods for the same model and resolution (probe vs
finetune). Each pair gets the paired bootstrap test of the macro AUROC difference (1,000
resamples; the indices depend only on the test-set size and the seed, so every comparison on a
test set uses the same resamples) and the p-values are adjusted across the whole report (Holm
by default). A report can instead be limited to chosen pairs (:class:`PairChoice`: an axis and
optionally its two values, e.g. ``model dinov3/vitb16 vs dinov2/base``), which also makes the
correction count only the comparisons asked for.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path
from typing import Literal

import numpy as np

from embedkit.eval import PairedTest, adjust_pvalues, bootstrap_indices, paired_bootstrap_test
from embedkit.results import ResultRecord, ScoreTable, load_scores


@dataclass(frozen=True, slots=True)
class Comparison:
    dataset: str
    axis: str  # resolution | model | method
    a: str  # "model · res · method" of the first run
    b: str
    metric: str
    delta: float  # metric(a) - metric(b)
    low: float
    high: float
    p_value: float
    p_adjusted: float
    n_test: int


Axis = Literal["resolution", "model", "method"]


@dataclass(frozen=True, slots=True)
class PairChoice:
    """Compare runs that differ only along ``axis``; with ``a`` and ``b``, only runs whose
    value on that axis is ``a`` against runs whose value is ``b`` (``a`` is reported as A)."""

    axis: Axis
    a: str | None = None
    b: str | None = None

    def __post_init__(self) -> None:
        if self.axis not in ("resolution", "model", "method"):
            raise ValueError(
                f"Expected axis resolution, model or method, got {self.axis!r} instead"
            )
        if (self.a is None) != (self.b is None) or (self.a is not None and self.a == self.b):
            raise ValueError(
                f"Expected both values of a pair or neither, and two different ones, got "
                f"a={self.a!r}, b={self.b!r} instead"
            )

    def orient(
        self, axis: str, first: ResultRecord, second: ResultRecord
    ) -> tuple[ResultRecord, ResultRecord] | None:
        """``(A, B)`` if this choice selects the pair, else None."""
        if axis != self.axis:
            return None
        if self.a is None:
            return first, second
        values = (_value(first, axis), _value(second, axis))
        if values == (self.a, self.b):
            return first, second
        if values == (self.b, self.a):
            return second, first
        return None


def _value(r: ResultRecord, axis: str) -> str:
    return {"resolution": str(r.resolution), "model": r.model, "method": r.kind}[axis]


def _label(r: ResultRecord) -> str:
    return f"{r.model} · {r.resolution}px · {r.kind}"


def _axis(a: ResultRecord, b: ResultRecord) -> str | None:
    same_model, same_res = a.model == b.model, a.resolution == b.resolution
    same_kind = a.kind == b.kind
    if same_model and same_kind and not same_res:
        return "resolution"
    if same_res and same_kind and not same_model:
        return "model"
    if same_model and same_res and not same_kind:
        return "method"
    return None


def _order(a: ResultRecord, b: ResultRecord, axis: str) -> tuple[ResultRecord, ResultRecord]:
    """Higher resolution first; otherwise a stable (name) order."""
    if axis == "resolution":
        return (a, b) if a.resolution > b.resolution else (b, a)
    return (a, b) if _label(a) <= _label(b) else (b, a)


def compare_records(
    records: Sequence[tuple[ResultRecord, Path]],
    *,
    n_boot: int = 1000,
    seed: int = 0,
    correction: Literal["holm", "bonferroni", "fdr_bh"] = "holm",
    pairs: Sequence[PairChoice] | None = None,
) -> list[Comparison]:
    """Paired tests between every comparable pair of ``(record, json path)``, or only between
    the pairs some :class:`PairChoice` of ``pairs`` selects."""
    scored: dict[tuple[str, tuple[str, ...]], list[tuple[ResultRecord, ScoreTable]]]
    scored = defaultdict(list)
    for record, path in records:
        if record.curve is not None or not path.with_suffix(".parquet").is_file():
            continue
        scores = load_scores(path)
        scored[(record.dataset, tuple(sorted(scores.ids)))].append((record, scores))
    pending: list[tuple[str, str, ResultRecord, ResultRecord, str, PairedTest, int]] = []
    for (dataset, ids), runs in sorted(scored.items(), key=lambda kv: kv[0][0]):
        order = np.argsort(runs[0][1].ids)  # every run's arrays are aligned to sorted ids
        idx = bootstrap_indices(
            len(ids), n_boot=n_boot, seed=seed,
            targets=runs[0][1].y[order], mask=runs[0][1].mask[order],
        )  # fmt: skip
        for (ra, sa), (rb, sb) in combinations(runs, 2):
            axis = _axis(ra, rb)
            if axis is None:
                continue
            first, second = _order(ra, rb, axis)
            if pairs is not None:
                chosen = next(
                    (o for c in pairs if (o := c.orient(axis, first, second)) is not None), None
                )
                if chosen is None:
                    continue
                first, second = chosen
            s_first, s_second = (sa, sb) if first is ra else (sb, sa)
            o1, o2 = np.argsort(s_first.ids), np.argsort(s_second.ids)  # align by image id
            y, mask = s_first.y[o1], s_first.mask[o1]
            metric = "ovr_macro_auroc" if y.ndim == 1 else "macro_auroc"
            test = paired_bootstrap_test(
                y, mask, s_first.scores[o1], s_second.scores[o2], idx, metric=metric
            )
            pending.append((dataset, axis, first, second, metric, test, len(ids)))
    if not pending:
        return []
    adjusted = adjust_pvalues(np.array([t[5].p_value for t in pending]), method=correction)
    return [
        Comparison(
            dataset,
            axis,
            _label(a),
            _label(b),
            metric,
            test.delta,
            test.ci[0],
            test.ci[1],
            test.p_value,
            float(p_adj),
            n,
        )
        for (dataset, axis, a, b, metric, test, n), p_adj in zip(pending, adjusted, strict=True)
    ]


def comparisons_markdown(comparisons: Sequence[Comparison], correction: str = "holm") -> str:
    lines = [
        f"| dataset | axis | A | B | Δ {comparisons[0].metric if comparisons else 'AUROC'} (A − B) "
        f"[95% CI] | p | p ({correction}) |",
        "|---|---|---|---|---|---|---|",
    ]
    for c in comparisons:
        lines.append(
            f"| {c.dataset} | {c.axis} | {c.a} | {c.b} | {c.delta:+.3f} [{c.low:+.3f}, "
            f"{c.high:+.3f}] | {c.p_value:.3g} | {c.p_adjusted:.3g} |"
        )
    return "\n".join(lines) + "\n"
