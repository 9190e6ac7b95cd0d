"""Classification metrics for probes on multi-label and multi-class radiology data.

Conventions (the manifest layer's): multi-label targets ``y`` are ``(N, L)`` in {0, 1} with a
boolean ``mask`` ``(N, L)`` (False = ignored / uncertain: the entry is left out of every metric);
multi-class targets ``y`` are ``(N,)`` integer class ids with a ``mask`` ``(N,)``.

Protocol (the CXR study, see ``docs/statistics.md``): per-label AUROC and its macro average, AP
and sensitivity / specificity at the Youden threshold as extras (records choose the threshold on
validation: :mod:`embedkit.eval.summary`). A label whose valid entries do not
contain both classes has no AUROC / AP: it gets NaN, is excluded from the macro average, and is
listed by :func:`labels_without_both_classes` and in :func:`evaluate_multilabel`'s report.

AUROC is the rank (Mann-Whitney) statistic with ties counted one half, which equals
``sklearn.metrics.roc_auc_score``; AP equals ``sklearn.metrics.average_precision_score``.
:func:`auroc_columns` computes AUROC for many label columns and many bootstrap replicates at once:
each column is sorted once, and replicate ``b`` enters as a row of per-sample weights (bootstrap
counts), so 1,000 replicates of 10k x 14 take seconds.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from embedkit.errors import MetricInputError

__all__ = [
    "MetricInputError",
    "accuracy",
    "auroc",
    "auroc_columns",
    "average_precision",
    "balanced_accuracy",
    "evaluate_multiclass",
    "evaluate_multilabel",
    "labels_without_both_classes",
    "macro_ap",
    "macro_auroc",
    "nanmean_or_nan",
    "one_hot",
    "ovr_macro_auroc",
    "per_label_ap",
    "per_label_auroc",
    "youden",
]

FloatArray = NDArray[np.float64]

# Replicates handled together by auroc_columns: bounds the (block, n) float64 temporaries.
_WEIGHT_BLOCK = 256


def _as_2d(
    y: ArrayLike, mask: ArrayLike | None, scores: ArrayLike
) -> tuple[NDArray[np.bool_], NDArray[np.bool_], FloatArray]:
    """Validate multi-label inputs; returns (positive, valid, scores) as (N, L) arrays."""
    y_arr = np.asarray(y)
    s_arr = np.asarray(scores, dtype=np.float64)
    if y_arr.ndim == 1:
        y_arr = y_arr[:, None]
    if s_arr.ndim == 1:
        s_arr = s_arr[:, None]
    if y_arr.ndim != 2 or s_arr.shape != y_arr.shape:
        raise MetricInputError(
            f"Expected targets and scores of the same shape (N, L) or (N,), got {y_arr.shape} "
            f"and {s_arr.shape} instead."
        )
    if mask is None:
        valid = np.ones(y_arr.shape, dtype=bool)
    else:
        valid = np.asarray(mask, dtype=bool)
        if valid.ndim == 1 and y_arr.shape[1] == 1:
            valid = valid[:, None]
        if valid.shape != y_arr.shape:
            raise MetricInputError(
                f"Expected a mask of shape {y_arr.shape}, got {valid.shape} instead."
            )
    y_valid = y_arr[valid]
    if y_valid.size and not np.isin(y_valid, (0, 1)).all():
        raise MetricInputError(
            "Expected binary targets in {0, 1} where the mask is True; got values "
            f"{np.unique(y_valid)[:10].tolist()}. Mark uncertain entries False in the mask."
        )
    if np.isnan(s_arr[valid]).any():
        raise MetricInputError("Scores contain NaN where the mask is True; fix the probe output.")
    return (y_arr == 1) & valid, valid, s_arr


def nanmean_or_nan(values: ArrayLike, axis: int | None = None) -> Any:
    """Mean over the non-NaN entries; NaN (without a warning) where all entries are NaN."""
    v = np.asarray(values, dtype=np.float64)
    finite = ~np.isnan(v)
    count = finite.sum(axis=axis)
    total = np.where(finite, v, 0.0).sum(axis=axis)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.where(count > 0, total / np.maximum(count, 1), np.nan)
    return float(out) if np.ndim(out) == 0 else out


def auroc_columns(
    y: ArrayLike,
    mask: ArrayLike | None,
    scores: ArrayLike,
    weights: ArrayLike | None = None,
) -> FloatArray:
    """AUROC of every label column, optionally for many weighted replicates at once.

    ``weights`` is ``(B, N)`` (e.g. bootstrap counts: row b = how often each sample is drawn in
    replicate b); the weighted AUROC is
    ``sum_{i pos, j neg} w_i w_j ([s_i > s_j] + 0.5 [s_i == s_j])`` over
    ``(sum_pos w)(sum_neg w)``, which for integer counts equals the AUROC of the resampled data.
    Returns ``(L,)`` without weights, ``(B, L)`` with; NaN where a column (replicate) lacks one of
    the two classes among its valid entries.
    """
    pos, valid, s = _as_2d(y, mask, scores)
    n, n_labels = s.shape
    w_all: NDArray[Any] | None = None
    if weights is not None:
        w_all = np.asarray(weights)
        if not np.issubdtype(w_all.dtype, np.integer):
            w_all = w_all.astype(np.float64, copy=False)
        if w_all.ndim != 2 or w_all.shape[1] != n:
            raise MetricInputError(
                f"Expected weights of shape (B, {n}), got {w_all.shape} instead."
            )
    n_rep = 1 if w_all is None else w_all.shape[0]
    out = np.full((n_rep, n_labels), np.nan)
    for label in range(n_labels):
        col = s[:, label]
        pos_rows = np.flatnonzero(valid[:, label] & pos[:, label])
        neg_rows = np.flatnonzero(valid[:, label] & ~pos[:, label])
        if pos_rows.size == 0 or neg_rows.size == 0:
            continue
        # Negatives sorted by score; for each positive, the negatives strictly below (lo) and
        # below-or-tied (hi): num = sum_pos w_i (W_neg(< s_i) + 0.5 W_neg(== s_i)).
        neg_rows = neg_rows[np.argsort(col[neg_rows], kind="stable")]
        neg_scores = col[neg_rows]
        lo = np.searchsorted(neg_scores, col[pos_rows], side="left")
        hi = np.searchsorted(neg_scores, col[pos_rows], side="right")
        ties = bool((hi != lo).any())
        if w_all is None:
            num = float(lo.sum()) + (0.5 * float((hi - lo).sum()) if ties else 0.0)
            out[0, label] = num / (pos_rows.size * neg_rows.size)
            continue
        for b0 in range(0, n_rep, _WEIGHT_BLOCK):
            w = w_all[b0 : b0 + _WEIGHT_BLOCK]
            wn = w[:, neg_rows]
            cum = np.zeros((w.shape[0], neg_rows.size + 1), dtype=np.result_type(wn, np.int64))
            np.cumsum(wn, axis=1, out=cum[:, 1:])
            wp = w[:, pos_rows]
            below = cum[:, lo] + cum[:, hi] if ties else cum[:, lo]
            num = np.einsum("ij,ij->i", wp, below).astype(np.float64)
            if ties:
                num *= 0.5
            den = wp.sum(axis=1).astype(np.float64) * cum[:, -1].astype(np.float64)
            with np.errstate(invalid="ignore", divide="ignore"):
                out[b0 : b0 + w.shape[0], label] = np.where(den > 0, num / den, np.nan)
    return out[0] if w_all is None else out


def per_label_auroc(y: ArrayLike, mask: ArrayLike | None, scores: ArrayLike) -> FloatArray:
    """AUROC per label column ``(L,)``; NaN for labels without both classes among valid entries."""
    return auroc_columns(y, mask, scores)


def auroc(y_true: ArrayLike, scores: ArrayLike, mask: ArrayLike | None = None) -> float:
    """Binary AUROC of one score vector (= ``sklearn.metrics.roc_auc_score``); NaN if undefined."""
    return float(auroc_columns(np.asarray(y_true).reshape(-1), mask, np.asarray(scores).ravel())[0])


def macro_auroc(y: ArrayLike, mask: ArrayLike | None, scores: ArrayLike) -> float:
    """Mean AUROC over the labels that have both classes among their valid entries."""
    return float(nanmean_or_nan(per_label_auroc(y, mask, scores)))


def _ap_one(is_pos: NDArray[np.bool_], s: FloatArray) -> float:
    n_pos = int(is_pos.sum())
    if n_pos == 0 or n_pos == is_pos.size:
        return float("nan")
    order = np.argsort(-s, kind="stable")
    s_sorted = s[order]
    hits = is_pos[order].astype(np.float64)
    # Last position of each group of tied scores: one threshold per distinct score.
    ends = np.r_[np.flatnonzero(s_sorted[1:] != s_sorted[:-1]), s_sorted.size - 1]
    tps = np.cumsum(hits)[ends]
    fps = (ends + 1) - tps
    precision = tps / (tps + fps)
    recall = tps / n_pos
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def per_label_ap(y: ArrayLike, mask: ArrayLike | None, scores: ArrayLike) -> FloatArray:
    """Average precision per label (equals ``sklearn.metrics.average_precision_score``).

    NaN for labels without both classes among valid entries.
    """
    pos, valid, s = _as_2d(y, mask, scores)
    return np.array(
        [_ap_one(pos[valid[:, j], j], s[valid[:, j], j]) for j in range(s.shape[1])],
        dtype=np.float64,
    )


def average_precision(y_true: ArrayLike, scores: ArrayLike, mask: ArrayLike | None = None) -> float:
    """Binary average precision of one score vector; NaN if undefined."""
    return float(per_label_ap(np.asarray(y_true).reshape(-1), mask, np.asarray(scores).ravel())[0])


def macro_ap(y: ArrayLike, mask: ArrayLike | None, scores: ArrayLike) -> float:
    """Mean AP over the labels that have both classes among their valid entries."""
    return float(nanmean_or_nan(per_label_ap(y, mask, scores)))


def labels_without_both_classes(y: ArrayLike, mask: ArrayLike | None) -> NDArray[np.intp]:
    """Indices of label columns whose valid entries lack positives or negatives."""
    y_arr = np.asarray(y)
    if y_arr.ndim == 1:
        y_arr = y_arr[:, None]
    valid = np.ones(y_arr.shape, bool) if mask is None else np.asarray(mask, bool)
    valid = valid.reshape(y_arr.shape)
    n_pos = ((y_arr == 1) & valid).sum(axis=0)
    n_neg = ((y_arr == 0) & valid).sum(axis=0)
    return np.flatnonzero((n_pos == 0) | (n_neg == 0))


def youden(
    y_true: ArrayLike, scores: ArrayLike, mask: ArrayLike | None = None
) -> tuple[float, float, float]:
    """Threshold maximising Youden's J = sensitivity + specificity - 1, and both rates there.

    A sample is called positive when ``score >= threshold``; candidate thresholds are the distinct
    scores. Ties in J are resolved towards the highest threshold. Returns
    ``(threshold, sensitivity, specificity)``; NaNs if the valid entries lack a class.
    """
    pos, valid, s = _as_2d(np.asarray(y_true).reshape(-1), mask, np.asarray(scores).ravel())
    is_pos, sv = pos[valid[:, 0], 0], s[valid[:, 0], 0]
    n_pos = int(is_pos.sum())
    n_neg = is_pos.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return (float("nan"), float("nan"), float("nan"))
    order = np.argsort(-sv, kind="stable")
    s_sorted = sv[order]
    ends = np.r_[np.flatnonzero(s_sorted[1:] != s_sorted[:-1]), s_sorted.size - 1]
    tps = np.cumsum(is_pos[order])[ends]
    fps = (ends + 1) - tps
    sens = tps / n_pos
    spec = 1.0 - fps / n_neg
    best = int(np.argmax(sens + spec - 1.0))
    return (float(s_sorted[ends[best]]), float(sens[best]), float(spec[best]))


def _multiclass_inputs(
    y: ArrayLike, mask: ArrayLike | None, n_rows: int
) -> tuple[NDArray[np.int64], NDArray[np.bool_]]:
    y_arr = np.asarray(y)
    if y_arr.ndim != 1 or y_arr.shape[0] != n_rows:
        raise MetricInputError(
            f"Expected multi-class targets of shape ({n_rows},), got {y_arr.shape} instead."
        )
    valid = np.ones(n_rows, bool) if mask is None else np.asarray(mask, bool)
    if valid.shape != (n_rows,):
        raise MetricInputError(f"Expected a mask of shape ({n_rows},), got {valid.shape} instead.")
    return y_arr.astype(np.int64), valid


def _predicted(pred_or_proba: ArrayLike) -> NDArray[np.int64]:
    p = np.asarray(pred_or_proba)
    return np.argmax(p, axis=1).astype(np.int64) if p.ndim == 2 else p.astype(np.int64)


def accuracy(y: ArrayLike, pred_or_proba: ArrayLike, mask: ArrayLike | None = None) -> float:
    """Top-1 accuracy over valid rows; accepts class ids ``(N,)`` or scores ``(N, K)`` (argmax)."""
    pred = _predicted(pred_or_proba)
    y_arr, valid = _multiclass_inputs(y, mask, pred.shape[0])
    if not valid.any():
        return float("nan")
    return float(np.mean(pred[valid] == y_arr[valid]))


def balanced_accuracy(
    y: ArrayLike, pred_or_proba: ArrayLike, mask: ArrayLike | None = None
) -> float:
    """Mean per-class recall over the classes present among valid targets (as scikit-learn)."""
    pred = _predicted(pred_or_proba)
    y_arr, valid = _multiclass_inputs(y, mask, pred.shape[0])
    yv, pv = y_arr[valid], pred[valid]
    classes = np.unique(yv)
    if classes.size == 0:
        return float("nan")
    return float(np.mean([np.mean(pv[yv == c] == c) for c in classes]))


def one_hot(y: ArrayLike, n_classes: int) -> NDArray[np.float64]:
    """``(N,)`` class ids -> ``(N, n_classes)`` one-hot float64."""
    y_arr = np.asarray(y, dtype=np.int64)
    out = np.zeros((y_arr.shape[0], n_classes))
    inside = (y_arr >= 0) & (y_arr < n_classes)
    out[np.flatnonzero(inside), y_arr[inside]] = 1.0
    return out


def ovr_macro_auroc(
    y: ArrayLike,
    proba: ArrayLike,
    mask: ArrayLike | None = None,
    weights: ArrayLike | None = None,
) -> Any:
    """One-vs-rest macro AUROC for multi-class scores ``(N, K)`` (column k = class id k).

    Equals ``roc_auc_score(y, proba, multi_class="ovr", average="macro")`` when every class is
    present; classes absent from the valid targets are excluded (NaN per class). With
    ``weights`` ``(B, N)`` returns ``(B,)`` replicate values.
    """
    p = np.asarray(proba, dtype=np.float64)
    y_arr, valid = _multiclass_inputs(y, mask, p.shape[0])
    onehot = one_hot(y_arr, p.shape[1])
    cols = auroc_columns(onehot, np.repeat(valid[:, None], p.shape[1], axis=1), p, weights)
    return nanmean_or_nan(cols, axis=-1)


def evaluate_multilabel(
    y: ArrayLike,
    mask: ArrayLike | None,
    scores: ArrayLike,
    label_names: list[str] | None = None,
) -> dict[str, Any]:
    """Per-label AUROC / AP, their macro averages and the labels excluded from the macros."""
    aurocs = per_label_auroc(y, mask, scores)
    aps = per_label_ap(y, mask, scores)
    names = label_names or [str(j) for j in range(aurocs.size)]
    excluded = labels_without_both_classes(y, mask)
    return {
        "macro_auroc": float(nanmean_or_nan(aurocs)),
        "macro_ap": float(nanmean_or_nan(aps)),
        "auroc": dict(zip(names, aurocs.tolist(), strict=True)),
        "ap": dict(zip(names, aps.tolist(), strict=True)),
        "excluded_labels": [names[j] for j in excluded],
    }


def evaluate_multiclass(y: ArrayLike, mask: ArrayLike | None, proba: ArrayLike) -> dict[str, Any]:
    """Accuracy, balanced accuracy and one-vs-rest macro AUROC of ``(N, K)`` scores."""
    return {
        "accuracy": accuracy(y, proba, mask),
        "balanced_accuracy": balanced_accuracy(y, proba, mask),
        "ovr_macro_auroc": float(ovr_macro_auroc(y, proba, mask)),
    }
