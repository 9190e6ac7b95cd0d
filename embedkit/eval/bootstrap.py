"""Bootstrap confidence intervals, paired bootstrap tests and multiple-testing corrections.

Protocol (the CXR study; ``docs/statistics.md``): 1,000 bootstrap resamples of the test set,
**the same resample indices for every model compared** (drawn with ``targets=`` so that every
resample keeps the test set's label set), 95% percentile CI, and a paired bootstrap p-value for
model A vs model B (kept for reference: the report's p-values come from
:func:`embedkit.eval.permutation.paired_permutation_test`, which holds α where this one does not).

Sharing the indices: :func:`bootstrap_indices` is deterministic (same ``n``, ``n_boot``, ``seed``
and ``strata`` give the same array on every machine, numpy ``PCG64``), but a comparison must not
rely on callers regenerating it: draw the array once and pass the *same* array to
:func:`bootstrap_ci` for every model and to :func:`paired_bootstrap_test`.

Paired bootstrap p-value (two-sided), with ``B`` replicates of the difference
``Δ*_b = m(A on resample b) - m(B on resample b)``::

    p = min(1, 2 * min((1 + #{Δ*_b <= 0}) / (B + 1), (1 + #{Δ*_b >= 0}) / (B + 1)))

(the "+1" correction keeps p > 0 with finitely many replicates; identical models give p = 1).
Replicates on which the metric is undefined (NaN, e.g. a resample without positives for every
label) are dropped and counted in the result.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal, NamedTuple, get_args

import numpy as np
from numpy.typing import ArrayLike, NDArray

from embedkit.errors import BootstrapError, did_you_mean
from embedkit.eval import metrics as M
from embedkit.progress import ProgressFactory, current_progress, no_progress

__all__ = [
    "BootstrapCI",
    "BootstrapError",
    "Correction",
    "PairedTest",
    "adjust_pvalues",
    "bootstrap_ci",
    "bootstrap_indices",
    "label_set_indices",
    "metric_function",
    "paired_bootstrap_test",
]

#: Resampled values (resamples x rows x columns) from which a runner's bar is shown: about a
#: second of work (1,000 x 20,000 x 14 took 3.8 s, benchmarks/RESULTS.md).
BAR_MIN_VALUES = 1 << 26

MetricFn = Callable[[NDArray[Any], NDArray[np.bool_] | None, NDArray[Any]], float]
# Vectorised form: (y, mask, scores, weights (B, N)) -> (B,)
_WeightedFn = Callable[
    [NDArray[Any], NDArray[np.bool_] | None, NDArray[Any], NDArray[Any]], NDArray[Any]
]


class BootstrapCI(NamedTuple):
    """Point estimate on the full data and a percentile interval from the replicates."""

    point: float
    low: float
    high: float
    n_valid: int  # replicates on which the metric was defined


class PairedTest(NamedTuple):
    """Difference A - B on the full data, its percentile CI and the two-sided bootstrap p-value."""

    delta: float
    ci: tuple[float, float]
    p_value: float
    n_valid: int


def _macro_auroc_weighted(
    y: NDArray[Any], mask: NDArray[np.bool_] | None, s: NDArray[Any], w: NDArray[Any]
) -> NDArray[Any]:
    return np.asarray(M.nanmean_or_nan(M.auroc_columns(y, mask, s, w), axis=1))


def _ovr_weighted(
    y: NDArray[Any], mask: NDArray[np.bool_] | None, s: NDArray[Any], w: NDArray[Any]
) -> NDArray[Any]:
    return np.asarray(M.ovr_macro_auroc(y, s, mask, w))


_METRICS: dict[str, MetricFn] = {
    "macro_auroc": M.macro_auroc,
    "macro_ap": M.macro_ap,
    "auroc": lambda y, m, s: M.auroc(y, s, m),
    "average_precision": lambda y, m, s: M.average_precision(y, s, m),
    "accuracy": lambda y, m, s: M.accuracy(y, s, m),
    "balanced_accuracy": lambda y, m, s: M.balanced_accuracy(y, s, m),
    "ovr_macro_auroc": lambda y, m, s: float(M.ovr_macro_auroc(y, s, m)),
}
_WEIGHTED: dict[str, _WeightedFn] = {
    "macro_auroc": _macro_auroc_weighted,
    "auroc": _macro_auroc_weighted,  # one column: its mean is itself
    "ovr_macro_auroc": _ovr_weighted,
}


def metric_function(metric: str | MetricFn) -> MetricFn:
    """Resolve a metric name (``macro_auroc``, ``macro_ap``, ``auroc``, ``average_precision``,
    ``accuracy``, ``balanced_accuracy``, ``ovr_macro_auroc``) or pass a callable
    ``f(y, mask, scores) -> float`` through."""
    if callable(metric):
        return metric
    if metric not in _METRICS:
        raise BootstrapError(
            f"Invalid metric '{metric}', choose one of {sorted(_METRICS)}"
            f"{did_you_mean(metric, _METRICS)}"
        )
    return _METRICS[metric]


def bootstrap_indices(
    n: int,
    n_boot: int = 1000,
    seed: int = 0,
    strata: ArrayLike | None = None,
    *,
    targets: ArrayLike | None = None,
    mask: ArrayLike | None = None,
) -> NDArray[np.int64]:
    """``(n_boot, n)`` resample indices (rows drawn with replacement), deterministic in the seed.

    With ``strata`` (``(n,)`` labels, e.g. a site id) each replicate resamples within every
    stratum, keeping stratum sizes fixed.

    With ``targets`` (``(n, L)`` multi-label 0/1 with an optional ``mask``, or ``(n,)`` class
    ids) every replicate keeps **the label set of the full data**: a replicate in which a label
    that has both classes among its valid entries on the full data loses all its positives or all
    its negatives is redrawn (from the same random stream, so the result is still a function of
    ``n``, ``n_boot``, ``seed``, ``strata``, targets and mask alone). A macro average over labels
    then averages the same labels in every replicate as in the point estimate (the rule of
    ``docs/statistics.md``); without it, resamples that miss a rare label average over fewer
    labels and widen the interval. Runs compared on the same test set (same targets and mask)
    get the same array: draw it once and pass it to every model's CI and to the paired test.
    """
    if n < 1 or n_boot < 1:
        raise BootstrapError(f"Expected n >= 1 and n_boot >= 1, got n={n}, n_boot={n_boot}.")
    rng = np.random.default_rng(seed)
    groups = None if strata is None else np.asarray(strata)
    if groups is not None and groups.shape != (n,):
        raise BootstrapError(f"Expected strata of shape ({n},), got {groups.shape} instead.")
    out = _draw(rng, n, n_boot, groups)
    if targets is None:
        return out
    pos, neg, names = _class_columns(targets, mask, n)
    for _round in range(_MAX_REDRAW_ROUNDS):
        bad = np.flatnonzero(_loses_a_class(out, pos, neg))
        if bad.size == 0:
            return out
        out[bad] = _draw(rng, n, bad.size, groups)
    bad_labels = sorted({names[j] for j in np.flatnonzero(_lost_labels(out, pos, neg))})
    raise BootstrapError(
        f"could not draw {n_boot} resamples that keep both classes of label(s) {bad_labels} "
        f"in {_MAX_REDRAW_ROUNDS} rounds: too few positives or negatives among {n} rows to "
        "bootstrap with a fixed label set; report those labels separately"
    )


def label_set_indices(
    n: int, n_boot: int, seed: int, targets: ArrayLike, mask: ArrayLike | None
) -> tuple[NDArray[np.int64], str | None]:
    """The resamples of a record or a report: :func:`bootstrap_indices` with the fixed label set,
    and None; or, when no such resamples can be drawn (several labels with one or two positives
    in a small test set), plain resamples and a note saying so, so that the run still gets its
    (flagged) intervals instead of failing."""
    try:
        return bootstrap_indices(n, n_boot, seed, targets=targets, mask=mask), None
    except BootstrapError as exc:
        note = (
            f"{exc}: the intervals use plain resamples instead (a replicate may average fewer "
            "labels than the point estimate; docs/statistics.md)"
        )
        return bootstrap_indices(n, n_boot, seed), note


#: Redraw rounds before :func:`bootstrap_indices` gives up on a fixed label set. A label with a
#: single positive among n rows is lost by a resample with probability (1 - 1/n)^n ≈ 0.37.
_MAX_REDRAW_ROUNDS = 200


def _draw(
    rng: np.random.Generator, n: int, n_boot: int, groups: NDArray[Any] | None
) -> NDArray[np.int64]:
    if groups is None:
        return rng.integers(0, n, size=(n_boot, n), dtype=np.int64)
    out = np.empty((n_boot, n), dtype=np.int64)
    for value in np.unique(groups):
        members = np.flatnonzero(groups == value)
        out[:, members] = members[rng.integers(0, members.size, size=(n_boot, members.size))]
    return out


def _class_columns(
    targets: ArrayLike, mask: ArrayLike | None, n: int
) -> tuple[NDArray[np.float64], NDArray[np.float64], list[str]]:
    """(n, L) indicator columns of the positives and negatives of every label that has both
    classes on the full data (multi-class: one column per class present, one-vs-rest)."""
    y = np.asarray(targets)
    if y.shape[0] != n:
        raise BootstrapError(f"Expected targets with {n} rows, got shape {y.shape} instead.")
    if y.ndim == 1:  # class ids: one-vs-rest columns of the classes present
        valid_rows = np.ones(n, bool) if mask is None else np.asarray(mask, bool).reshape(n)
        classes = np.unique(y[valid_rows])
        pos = (y[:, None] == classes[None, :]) & valid_rows[:, None]
        neg = (y[:, None] != classes[None, :]) & valid_rows[:, None]
        names = [f"class {c}" for c in classes]
    else:
        valid = np.ones(y.shape, bool) if mask is None else np.asarray(mask, bool)
        pos = valid & (y == 1)
        neg = valid & (y != 1)
        names = [f"column {j}" for j in range(y.shape[1])]
    keep = pos.any(axis=0) & neg.any(axis=0)
    return (
        pos[:, keep].astype(np.float64),
        neg[:, keep].astype(np.float64),
        [nm for nm, k in zip(names, keep, strict=True) if k],
    )


def _class_counts(
    indices: NDArray[np.int64], pos: NDArray[np.float64], neg: NDArray[np.float64]
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    n = pos.shape[0]
    pos_c = np.empty((indices.shape[0], pos.shape[1]))
    neg_c = np.empty_like(pos_c)
    block = max(1, 2**23 // max(n, 1))  # bound the (block, n) counts matrix to ~64 MB
    for lo in range(0, indices.shape[0], block):
        counts = _counts(indices[lo : lo + block], n).astype(np.float64)
        pos_c[lo : lo + block] = counts @ pos
        neg_c[lo : lo + block] = counts @ neg
    return pos_c, neg_c


def _loses_a_class(
    indices: NDArray[np.int64], pos: NDArray[np.float64], neg: NDArray[np.float64]
) -> NDArray[np.bool_]:
    """(B,) True where the replicate lacks a class of any kept label."""
    if pos.shape[1] == 0:
        return np.zeros(indices.shape[0], bool)
    pos_c, neg_c = _class_counts(indices, pos, neg)
    return np.asarray(((pos_c == 0) | (neg_c == 0)).any(axis=1))


def _lost_labels(
    indices: NDArray[np.int64], pos: NDArray[np.float64], neg: NDArray[np.float64]
) -> NDArray[np.bool_]:
    """(L,) True for kept labels that some replicate still loses."""
    pos_c, neg_c = _class_counts(indices, pos, neg)
    return np.asarray(((pos_c == 0) | (neg_c == 0)).any(axis=0))


def _counts(indices: NDArray[np.int64], n: int) -> NDArray[np.int64]:
    """(B, n) bootstrap counts: how often each row is drawn in each replicate (integers, so the
    weighted AUROC sums are exact)."""
    n_boot = indices.shape[0]
    flat = (indices + (np.arange(n_boot, dtype=np.int64) * n)[:, None]).ravel()
    return np.bincount(flat, minlength=n_boot * n).reshape(n_boot, n)


def _replicates(
    y: NDArray[Any],
    mask: NDArray[np.bool_] | None,
    scores: NDArray[Any],
    metric: str | MetricFn,
    indices: NDArray[np.int64],
    progress: ProgressFactory | None = None,
) -> NDArray[np.float64]:
    n = y.shape[0]
    if indices.ndim != 2 or (indices.size and (indices.min() < 0 or indices.max() >= n)):
        raise BootstrapError(
            f"Expected bootstrap indices of shape (B, n) with values in [0, {n}), got "
            f"shape {indices.shape}; draw them with bootstrap_indices({n}, ...)."
        )
    n_boot = indices.shape[0]
    if progress is None:  # the runner's bar, for resampling work of about a second or more
        big = n_boot * n * (scores.shape[1] if scores.ndim == 2 else 1) >= BAR_MIN_VALUES
        progress = current_progress() if big else no_progress
    name = metric if isinstance(metric, str) else getattr(metric, "__name__", "metric")
    with progress(n_boot, f"bootstrap {name} (resamples)") as advance:
        if isinstance(metric, str) and metric in _WEIGHTED:
            fn = _WEIGHTED[metric]
            out = np.empty(n_boot)
            block = max(1, 2**24 // max(n, 1))  # bound the (block, n) counts matrix to ~128 MB
            for lo in range(0, n_boot, block):
                out[lo : lo + block] = fn(y, mask, scores, _counts(indices[lo : lo + block], n))
                advance(min(block, n_boot - lo))
            return out
        fn_plain = metric_function(metric)
        values = []
        for i in indices:
            values.append(fn_plain(y[i], None if mask is None else mask[i], scores[i]))
            advance(1)
        return np.array(values, dtype=np.float64)


def _check(
    y: ArrayLike, mask: ArrayLike | None, *scores: ArrayLike
) -> tuple[NDArray[Any], NDArray[np.bool_] | None, list[NDArray[Any]]]:
    y_arr = np.asarray(y)
    m_arr = None if mask is None else np.asarray(mask, dtype=bool)
    s_arrs = [np.asarray(s) for s in scores]
    for s in s_arrs:
        if s.shape[0] != y_arr.shape[0]:
            raise BootstrapError(
                f"Expected scores with {y_arr.shape[0]} rows like the targets, got {s.shape}."
            )
    return y_arr, m_arr, s_arrs


def _percentiles(values: NDArray[np.float64], level: float) -> tuple[float, float]:
    if not 0.0 < level < 1.0:
        raise BootstrapError(f"Expected a confidence level in (0, 1), got {level}.")
    if values.size == 0:
        return (float("nan"), float("nan"))
    alpha = (1.0 - level) / 2.0
    low, high = np.quantile(values, [alpha, 1.0 - alpha])
    return (float(low), float(high))


def bootstrap_ci(
    y: ArrayLike,
    mask: ArrayLike | None,
    scores: ArrayLike,
    metric: str | MetricFn = "macro_auroc",
    indices: NDArray[np.int64] | None = None,
    level: float = 0.95,
    progress: ProgressFactory | None = None,
) -> BootstrapCI:
    """Point estimate and percentile CI of ``metric`` over bootstrap resamples of the rows.

    ``indices`` defaults to ``bootstrap_indices(N)`` (1,000 replicates, seed 0, CXR study);
    comparisons must pass one shared array. ``macro_auroc`` / ``auroc`` / ``ovr_macro_auroc``
    use the vectorised weighted-rank AUROC; other metrics loop over the replicates.
    ``progress``: a factory ``(total, description) -> context yielding advance(n)`` advanced per
    resample (None: the runner's :func:`~embedkit.progress.current_progress` when the work has
    at least :data:`BAR_MIN_VALUES` resampled values, else no bar).
    """
    y_arr, m_arr, (s_arr,) = _check(y, mask, scores)
    idx = bootstrap_indices(y_arr.shape[0]) if indices is None else np.asarray(indices)
    point = float(metric_function(metric)(y_arr, m_arr, s_arr))
    reps = _replicates(y_arr, m_arr, s_arr, metric, idx, progress)
    reps = reps[~np.isnan(reps)]
    low, high = _percentiles(reps, level)
    return BootstrapCI(point, low, high, int(reps.size))


def paired_bootstrap_test(
    y: ArrayLike,
    mask: ArrayLike | None,
    scores_a: ArrayLike,
    scores_b: ArrayLike,
    indices: NDArray[np.int64],
    metric: str | MetricFn = "macro_auroc",
    level: float = 0.95,
) -> PairedTest:
    """Paired bootstrap comparison of two models' scores on the same test set.

    Both models are evaluated on the same resamples (``indices``); returns the difference
    ``metric(A) - metric(B)`` on the full data, the percentile CI of the replicate differences, and
    the two-sided p-value ``min(1, 2 * min((1 + #{Δ* <= 0}), (1 + #{Δ* >= 0})) / (B + 1))``.
    """
    y_arr, m_arr, (sa, sb) = _check(y, mask, scores_a, scores_b)
    idx = np.asarray(indices)
    fn = metric_function(metric)
    delta = float(fn(y_arr, m_arr, sa) - fn(y_arr, m_arr, sb))
    diffs = _replicates(y_arr, m_arr, sa, metric, idx) - _replicates(y_arr, m_arr, sb, metric, idx)
    diffs = diffs[~np.isnan(diffs)]
    n_valid = int(diffs.size)
    if n_valid == 0:
        return PairedTest(delta, (float("nan"), float("nan")), float("nan"), 0)
    le = (1 + int(np.sum(diffs <= 0))) / (n_valid + 1)
    ge = (1 + int(np.sum(diffs >= 0))) / (n_valid + 1)
    p = min(1.0, 2.0 * min(le, ge))
    return PairedTest(delta, _percentiles(diffs, level), p, n_valid)


#: The multiple-comparison corrections :func:`adjust_pvalues` applies.
Correction = Literal["holm", "bonferroni", "fdr_bh"]


def adjust_pvalues(p: ArrayLike, method: Correction = "holm") -> NDArray[np.float64]:
    """Adjust p-values for multiple comparisons; NaN entries stay NaN and do not count.

    ``bonferroni``: ``min(1, m p)``. ``holm`` (step-down, family-wise): sorted ascending,
    ``p_(i) * (m - i + 1)``, made non-decreasing by a running max, capped at 1. ``fdr_bh``
    (Benjamini-Hochberg, false discovery rate): ``p_(i) * m / i``, made non-increasing from the
    largest by a running min, capped at 1.
    """
    p_arr = np.asarray(p, dtype=np.float64)
    out = np.full(p_arr.shape, np.nan)
    finite = ~np.isnan(p_arr)
    values = p_arr[finite]
    if values.size and ((values < 0) | (values > 1)).any():
        raise BootstrapError("Expected p-values in [0, 1].")
    m = values.size
    if m == 0:
        return out
    order = np.argsort(values, kind="stable")
    ranked = values[order]
    rank = np.arange(1, m + 1)
    if method == "bonferroni":
        adj_sorted = ranked * m
    elif method == "holm":
        adj_sorted = np.maximum.accumulate(ranked * (m - rank + 1))
    elif method == "fdr_bh":
        adj_sorted = np.minimum.accumulate((ranked * m / rank)[::-1])[::-1]
    else:
        choices = list(get_args(Correction))
        raise BootstrapError(
            f"Invalid method '{method}', choose one of {choices}{did_you_mean(method, choices)}"
        )
    adjusted = np.empty(m)
    adjusted[order] = np.minimum(adj_sorted, 1.0)
    out[finite] = adjusted
    return out
