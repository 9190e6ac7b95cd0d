"""Paired comparisons between runs evaluated on the same test images (``docs/statistics.md``).

Which pairs: among records of one dataset whose saved test scores cover the same image ids,

- by default every pair that differs in one attribute: the same model and method at two
  resolution tiers (e.g. 512 vs 224), two models at the same tier and method, or two methods for
  the same model and tier (probe vs finetune). A run's **tier** is the resolution asked for
  (:attr:`ResultRecord.tier`: 224 / 512 / 1024), not the one snapped to the patch grid, so
  DINOv2 at 518 px pairs with DINOv3 at 512 px;
- or only the pairs some entry of ``pairs`` selects: a :class:`PairChoice` (an axis and
  optionally its two values, e.g. ``model dinov3/vitb16 vs dinov2/base``) or a :class:`RunPair`
  (two arbitrary run selectors, e.g. the frozen 7B linear probe against a finetuned base model;
  attributes neither selector names must agree). The correction then counts only those.

Each pair gets the **paired permutation test** of the macro AUROC difference
(:func:`~embedkit.eval.permutation.paired_permutation_test`, per-image swaps of the two models'
ranks: it holds α where the paired bootstrap p-value does not) and the **paired bootstrap
percentile CI** of the difference (1,000 resamples that keep the test set's label set; the
indices depend only on the test set and the seed, so every comparison on a test set uses the
same resamples). The p-values are adjusted across the whole report (Holm by default).

Segmentation runs (``task = "segmentation"``) pair only with segmentation runs, by the same
rules; frozen-probe and finetuned records of one dataset pair like any two runs (both write the
same score table, :func:`embedkit.results.segmentation.dice_table`). Their metric is the mean
per-image Dice (:func:`paired_dice_test`: sign-flip permutation test and paired bootstrap CI of
the mean difference), and their p-values are adjusted together with the classification ones.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, fields
from itertools import combinations
from pathlib import Path
from typing import Literal, NamedTuple

import numpy as np

from embedkit.eval import adjust_pvalues, paired_bootstrap_test
from embedkit.eval.bootstrap import Correction, bootstrap_indices, label_set_indices
from embedkit.eval.permutation import paired_permutation_test
from embedkit.eval.segmentation import case_means
from embedkit.report.tables import SEGMENTATION_HEADLINE
from embedkit.results import ResultRecord, ScoreTable, load_scores
from embedkit.results.segmentation import is_segmentation

#: What the report's p-values and CIs are, as the comparisons table says it.
TEST_NAME = "paired permutation (ranks)"
CI_NAME = "paired bootstrap percentile"
#: The same for segmentation comparisons (per-image mean Dice).
DICE_TEST_NAME = "paired sign-flip permutation (per-image mean Dice)"


@dataclass(frozen=True, slots=True)
class Comparison:
    dataset: str
    axis: str  # resolution | model | method, or the attributes a RunPair's runs differ in
    a: str  # "model · res · method" of the first run
    b: str
    metric: str
    delta: float  # metric(a) - metric(b)
    low: float  # paired bootstrap percentile CI of the difference
    high: float
    p_value: float  # paired permutation test, two-sided
    p_adjusted: float
    n_test: int
    test: str = f"{TEST_NAME}; CI {CI_NAME}"
    n_resamples: int = 0  # permutations (= bootstrap resamples)


Axis = Literal["resolution", "model", "method"]
_AXES = ("resolution", "model", "method")


@dataclass(frozen=True, slots=True)
class PairChoice:
    """Compare runs that differ only along ``axis``; with ``a`` and ``b``, only runs whose
    value on that axis is ``a`` against runs whose value is ``b`` (``a`` is reported as A)."""

    axis: Axis
    a: str | None = None
    b: str | None = None

    def __post_init__(self) -> None:
        if self.axis not in _AXES:
            raise ValueError(
                f"Expected axis resolution, model or method, got {self.axis!r} instead"
            )
        if (self.a is None) != (self.b is None) or (self.a is not None and self.a == self.b):
            raise ValueError(
                f"Expected both values of a pair or neither, and two different ones, got "
                f"a={self.a!r}, b={self.b!r} instead"
            )

    def orient(
        self, first: ResultRecord, second: ResultRecord
    ) -> tuple[ResultRecord, ResultRecord] | None:
        """``(A, B)`` if this choice selects the pair, else None."""
        axis = _axis(first, second)
        if axis != self.axis:
            return None
        if self.a is None:
            return _order(first, second, axis)
        values = (_value(first, axis), _value(second, axis))
        if values == (self.a, self.b):
            return first, second
        if values == (self.b, self.a):
            return second, first
        return None


@dataclass(frozen=True, slots=True)
class RunSelector:
    """Which runs one side of a :class:`RunPair` means; an attribute left None matches any.

    ``model``: the canonical encoder name as records hold it; ``method``: a probe kind
    (``linear``) or a finetuning method (``full`` or ``finetune-full``); ``resolution``: the
    nominal tier (224 / 512 / 1024); ``pooling``: the record's pooling."""

    model: str | None = None
    method: str | None = None
    resolution: int | None = None
    pooling: str | None = None

    def __post_init__(self) -> None:
        if all(getattr(self, f.name) is None for f in fields(self)):
            raise ValueError(
                "Expected a run selector naming at least one of model, method, resolution, "
                "pooling, got none"
            )

    def matches(self, r: ResultRecord) -> bool:
        return (
            (self.model is None or r.model == self.model)
            and (self.method is None or r.kind in (self.method, f"finetune-{self.method}"))
            and (self.resolution is None or r.tier == self.resolution)
            and (self.pooling is None or r.pooling == self.pooling)
        )

    def named(self) -> set[str]:
        """The attributes this selector fixes (pooling is not an axis: never required equal)."""
        return {f.name for f in fields(self) if getattr(self, f.name) is not None}


@dataclass(frozen=True, slots=True)
class RunPair:
    """Compare the runs ``a`` selects with the runs ``b`` selects (``a`` reported as A).

    Two runs pair when one matches ``a``, the other ``b``, and they agree on every attribute
    (model, method, resolution tier) that neither selector names: ``a: {model: dinov3/vit7b16,
    method: linear}`` against ``b: {model: dinov3/vitb16, method: full}`` pairs the 7B probe and
    the finetuned ViT-B at each tier."""

    a: RunSelector
    b: RunSelector

    def orient(
        self, first: ResultRecord, second: ResultRecord
    ) -> tuple[ResultRecord, ResultRecord] | None:
        free = set(_AXES) - self.a.named() - self.b.named()
        if any(_value(first, x) != _value(second, x) for x in free):
            return None
        if self.a.matches(first) and self.b.matches(second):
            return first, second
        if self.a.matches(second) and self.b.matches(first):
            return second, first
        return None


def _value(r: ResultRecord, axis: str) -> str:
    return {"resolution": str(r.tier), "model": r.model, "method": r.kind}[axis]


def _label(r: ResultRecord) -> str:
    res = f"{r.tier}px" if r.tier == r.resolution else f"{r.tier}px ({r.resolution})"
    return f"{r.model} · {res} · {r.kind}"


def _differences(a: ResultRecord, b: ResultRecord) -> list[str]:
    return [x for x in _AXES if _value(a, x) != _value(b, x)]


def _axis(a: ResultRecord, b: ResultRecord) -> str | None:
    differ = _differences(a, b)
    return differ[0] if len(differ) == 1 else None


def _order(a: ResultRecord, b: ResultRecord, axis: str) -> tuple[ResultRecord, ResultRecord]:
    """Higher resolution first; otherwise a stable (name) order."""
    if axis == "resolution":
        return (a, b) if a.tier > b.tier else (b, a)
    return (a, b) if _label(a) <= _label(b) else (b, a)


def _choose(
    first: ResultRecord, second: ResultRecord, pairs: Sequence[PairChoice | RunPair] | None
) -> tuple[ResultRecord, ResultRecord] | None:
    """``(A, B)`` of a pair of runs the report compares, or None."""
    if pairs is None:
        axis = _axis(first, second)
        return None if axis is None else _order(first, second, axis)
    return next((o for c in pairs if (o := c.orient(first, second)) is not None), None)


def _both_scored(
    a: np.ndarray, b: np.ndarray, mask: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Multi-label: a label one run left unscored (NaN: one class in its train split) is left
    out of the pair's macro, like an undefined label."""
    if mask.ndim == 1:
        return a, b, mask
    scored = ~(np.isnan(a).all(axis=0) | np.isnan(b).all(axis=0))
    return np.nan_to_num(a), np.nan_to_num(b), mask & scored[None, :]


class PairedDice(NamedTuple):
    """Mean per-image Dice of A minus B, its paired bootstrap CI and permutation p-value."""

    delta: float
    low: float
    high: float
    p_value: float
    n_perm: int


def paired_dice_test(
    dice_a: np.ndarray, dice_b: np.ndarray, *, n_boot: int = 1000, n_perm: int = 2000, seed: int = 0
) -> PairedDice:
    """Compare two runs' per-image Dice (n, L), rows aligned by image.

    An image's Dice is its mean over the classes it has a score for in that run
    (:func:`~embedkit.eval.segmentation.case_means`: NaN, a class absent from truth and
    prediction, is left out); images without a score in either run are left out of the pair.
    The per-image difference ``d_i`` of those means is the unit: the observed
    statistic is ``mean(d)``; the two-sided p-value is the share of sign flips (under the null,
    A's and B's Dice of an image are exchangeable, so each ``d_i`` is as likely negated) whose
    ``|mean(s * d)|`` is at least the observed (+1 in both counts); the 95% CI is the percentile
    interval of ``mean(d)`` over paired bootstrap resamples of the images."""
    a, b = np.asarray(dice_a, np.float64), np.asarray(dice_b, np.float64)
    if a.shape != b.shape or a.ndim != 2 or a.shape[0] == 0:
        raise ValueError(
            f"Expected two per-image Dice arrays of one shape (n, L), got {a.shape} and "
            f"{b.shape} instead"
        )
    d = case_means(a) - case_means(b)
    d = d[np.isfinite(d)]
    if d.size == 0:
        raise ValueError("no image has a Dice score in both runs")
    observed = float(d.mean())
    idx = bootstrap_indices(d.size, n_boot, seed)
    low, high = np.percentile(d[idx].mean(1), [2.5, 97.5])
    rng = np.random.default_rng(seed)
    signs = np.where(rng.random((n_perm, d.size)) < 0.5, -1.0, 1.0)
    permuted = np.abs(signs @ d / d.size)
    tol = 1e-12 * max(1.0, abs(observed))
    extreme = int(np.sum(permuted >= abs(observed) - tol))
    return PairedDice(observed, float(low), float(high), (1 + extreme) / (n_perm + 1), n_perm)


def compare_records(
    records: Sequence[tuple[ResultRecord, Path]],
    *,
    n_boot: int = 1000,
    seed: int = 0,
    correction: Correction = "holm",
    pairs: Sequence[PairChoice | RunPair] | None = None,
    n_perm: int | None = None,
) -> list[Comparison]:
    """Paired tests between every comparable pair of ``(record, json path)``, or only between
    the pairs some entry of ``pairs`` selects. ``n_perm`` (default: ``max(n_boot, 2000)``) is
    the number of permutations of each test."""
    perms = max(n_boot, 2000) if n_perm is None else n_perm
    scored: dict[tuple[str, bool, tuple[str, ...]], list[tuple[ResultRecord, ScoreTable]]]
    scored = defaultdict(list)
    for record, path in records:
        if record.curve is not None or not path.with_suffix(".parquet").is_file():
            continue
        scores = load_scores(path)
        key = (record.dataset, is_segmentation(record), tuple(sorted(scores.ids)))
        scored[key].append((record, scores))
    pending: list[tuple[str, str, ResultRecord, ResultRecord, str, tuple[float, ...], int]]
    pending = []
    for (dataset, segmentation, ids), runs in sorted(scored.items(), key=lambda kv: kv[0][:2]):
        order = np.argsort(runs[0][1].ids)  # every run's arrays are aligned to sorted ids
        y, mask = runs[0][1].y[order], runs[0][1].mask[order]
        if not segmentation:  # the fallback is noted in the records
            idx, _fallback = label_set_indices(len(ids), n_boot, seed, y, mask)
        for (ra, sa), (rb, sb) in combinations(runs, 2):
            chosen = _choose(ra, rb, pairs)
            if chosen is None:
                continue
            first, second = chosen
            s_first, s_second = (sa, sb) if first is ra else (sb, sa)
            o1, o2 = np.argsort(s_first.ids), np.argsort(s_second.ids)  # align by image id
            axis = ", ".join(_differences(first, second)) or "same run attributes"
            if segmentation:  # per-image Dice: sign-flip permutation + paired bootstrap
                dice = paired_dice_test(s_first.scores[o1], s_second.scores[o2], n_boot=n_boot,
                                        n_perm=perms, seed=seed)  # fmt: skip
                numbers = (dice.delta, dice.low, dice.high, dice.p_value)
                pending.append((dataset, axis, first, second, SEGMENTATION_HEADLINE, numbers,
                                len(ids)))  # fmt: skip
                continue
            metric = "ovr_macro_auroc" if y.ndim == 1 else "macro_auroc"
            sc1, sc2, m = _both_scored(s_first.scores[o1], s_second.scores[o2], mask)
            boot = paired_bootstrap_test(y, m, sc1, sc2, idx, metric=metric)
            perm = paired_permutation_test(y, m, sc1, sc2, n_perm=perms, seed=seed)
            numbers = (boot.delta, boot.ci[0], boot.ci[1], perm.p_value)
            pending.append((dataset, axis, first, second, metric, numbers, len(ids)))
    if not pending:
        return []
    adjusted = adjust_pvalues(np.array([t[5][3] for t in pending]), method=correction)
    return [
        Comparison(
            dataset,
            axis,
            _label(a),
            _label(b),
            metric,
            delta,
            low,
            high,
            p,
            float(p_adj),
            n,
            test=f"{DICE_TEST_NAME if metric == SEGMENTATION_HEADLINE else TEST_NAME}; "
            f"CI {CI_NAME}",
            n_resamples=perms,
        )
        for (dataset, axis, a, b, metric, (delta, low, high, p), n), p_adj in zip(
            pending, adjusted, strict=True
        )
    ]


def comparisons_markdown(comparisons: Sequence[Comparison], correction: str = "holm") -> str:
    lines = [
        f"p: two-sided {TEST_NAME} test ({comparisons[0].n_resamples if comparisons else 0} "
        f"permutations), adjusted across this table ({correction}); 95% CI: {CI_NAME} of the "
        "difference (resamples keep the test set's label set). See docs/statistics.md.",
        "",
        f"| dataset | axis | A | B | Δ {comparisons[0].metric if comparisons else 'AUROC'} (A − B) "
        f"[95% CI] | p | p ({correction}) |",
        "|---|---|---|---|---|---|---|",
    ]
    mixed = len({c.metric for c in comparisons}) > 1
    if any(c.metric == SEGMENTATION_HEADLINE for c in comparisons):
        dice = (
            f"two-sided {DICE_TEST_NAME} test ({comparisons[0].n_resamples} sign flips), "
            f"adjusted across this table ({correction}); 95% CI: {CI_NAME} of the mean "
            "per-image difference."
        )
        if mixed:
            lines[0] += f" Rows of {SEGMENTATION_HEADLINE} (segmentation): p: {dice}"
        else:
            lines[0] = f"p: {dice} See docs/statistics.md."
    if mixed:
        lines[2] = lines[2].replace(f"Δ {comparisons[0].metric} (A − B)", "Δ metric (A − B)")
    for c in comparisons:
        metric = f"{c.metric} " if mixed else ""
        lines.append(
            f"| {c.dataset} | {c.axis} | {c.a} | {c.b} | {metric}{c.delta:+.3f} [{c.low:+.3f}, "
            f"{c.high:+.3f}] | {c.p_value:.3g} | {c.p_adjusted:.3g} |"
        )
    return "\n".join(lines) + "\n"
