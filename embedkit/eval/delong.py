"""DeLong's test for correlated AUROCs, with the fast midrank algorithm of Sun & Xu (2014).

DeLong, DeLong & Clarke-Pearson (1988) estimate the covariance of AUROCs computed on the same
samples from the structural components ``V10(x_i) = mean_j psi(x_i, y_j)`` (one per positive) and
``V01(y_j) = mean_i psi(x_i, y_j)`` (one per negative), ``psi(x, y) = [x > y] + 0.5 [x == y]``:
``S = S10 / m + S01 / n`` with ``S10``, ``S01`` the sample covariances (ddof 1) over positives /
negatives. Sun & Xu (IEEE SPL 21(11), 2014) get the components from midranks in
O(N log N): ``V10_i = (R_i - R^pos_i) / n`` and ``V01_j = 1 - (R_j - R^neg_j) / m`` with ``R``
the midrank among all samples and ``R^pos`` / ``R^neg`` the midrank within the class.

The test of two AUROCs uses ``z = (AUC_a - AUC_b) / sqrt(Var_a + Var_b - 2 Cov_ab)`` and the
two-sided normal p-value. It is the classical alternative to the paired bootstrap of the CXR
study (``docs/statistics.md``).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy.stats import norm, rankdata

from embedkit.eval.metrics import MetricInputError

__all__ = [
    "DeLongResult",
    "delong_ci",
    "delong_covariance",
    "delong_test",
    "delong_test_per_label",
]


class DeLongResult(NamedTuple):
    """AUROCs of two models, the z statistic of their difference and its two-sided p-value."""

    auc_a: float
    auc_b: float
    z: float
    p_value: float


def _split(
    y_true: ArrayLike, scores: ArrayLike, mask: ArrayLike | None
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """(k, m) positive and (k, n) negative scores; ``scores`` is (N,) or (k, N)."""
    y = np.asarray(y_true).reshape(-1)
    s = np.atleast_2d(np.asarray(scores, dtype=np.float64))
    if s.shape[1] != y.shape[0]:
        raise MetricInputError(
            f"Expected scores with {y.shape[0]} entries like the targets, got {s.shape}."
        )
    valid = np.ones(y.shape, bool) if mask is None else np.asarray(mask, bool).reshape(-1)
    if not np.isin(y[valid], (0, 1)).all():
        raise MetricInputError("Expected binary targets in {0, 1} where the mask is True.")
    if np.isnan(s[:, valid]).any():
        raise MetricInputError("Scores contain NaN where the mask is True.")
    return s[:, valid & (y == 1)], s[:, valid & (y == 0)]


def delong_covariance(
    y_true: ArrayLike, scores: ArrayLike, mask: ArrayLike | None = None
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """AUROCs ``(k,)`` and their DeLong covariance ``(k, k)`` for ``k`` score vectors ``(k, N)``.

    NaNs if the valid entries lack positives or negatives (or have fewer than 2 of either, where
    the sample covariance is undefined).
    """
    pos, neg = _split(y_true, scores, mask)
    k, m = pos.shape
    n = neg.shape[1]
    if m < 2 or n < 2:
        return np.full(k, np.nan), np.full((k, k), np.nan)
    both = np.concatenate([pos, neg], axis=1)
    r_all = rankdata(both, axis=1)
    r_pos = rankdata(pos, axis=1)
    r_neg = rankdata(neg, axis=1)
    aucs = (r_all[:, :m].sum(axis=1) - m * (m + 1) / 2.0) / (m * n)
    v10 = (r_all[:, :m] - r_pos) / n
    v01 = 1.0 - (r_all[:, m:] - r_neg) / m
    s10 = np.atleast_2d(np.cov(v10))
    s01 = np.atleast_2d(np.cov(v01))
    return aucs, s10 / m + s01 / n


def delong_ci(
    y_true: ArrayLike, scores: ArrayLike, mask: ArrayLike | None = None, level: float = 0.95
) -> tuple[float, float, float]:
    """``(auc, low, high)``: normal-approximation CI with the DeLong variance, clipped to [0, 1]."""
    aucs, cov = delong_covariance(y_true, np.asarray(scores).reshape(1, -1), mask)
    auc, var = float(aucs[0]), float(cov[0, 0])
    half = float(norm.ppf(0.5 + level / 2.0)) * np.sqrt(max(var, 0.0))
    return auc, max(0.0, auc - half), min(1.0, auc + half)


def delong_test(
    y_true: ArrayLike, scores_a: ArrayLike, scores_b: ArrayLike, mask: ArrayLike | None = None
) -> DeLongResult:
    """DeLong's test of AUROC(a) = AUROC(b) for two score vectors on the same samples.

    When the variance of the difference is 0 (e.g. identical or identically ranked scores):
    z = 0, p = 1 if the AUROCs are equal, else z = ±inf, p = 0.
    """
    s = np.stack(
        [np.asarray(scores_a, np.float64).ravel(), np.asarray(scores_b, np.float64).ravel()]
    )
    aucs, cov = delong_covariance(y_true, s, mask)
    diff = float(aucs[0] - aucs[1])
    var = float(cov[0, 0] + cov[1, 1] - 2.0 * cov[0, 1])
    if np.isnan(diff) or np.isnan(var):
        return DeLongResult(float(aucs[0]), float(aucs[1]), float("nan"), float("nan"))
    if var <= 1e-15 * max(1.0, float(cov[0, 0] + cov[1, 1])):
        if abs(diff) <= 1e-12:
            return DeLongResult(float(aucs[0]), float(aucs[1]), 0.0, 1.0)
        return DeLongResult(float(aucs[0]), float(aucs[1]), float(np.sign(diff) * np.inf), 0.0)
    z = diff / np.sqrt(var)
    return DeLongResult(float(aucs[0]), float(aucs[1]), float(z), float(2.0 * norm.sf(abs(z))))


def delong_test_per_label(
    y: ArrayLike, mask: ArrayLike | None, scores_a: ArrayLike, scores_b: ArrayLike
) -> list[DeLongResult]:
    """:func:`delong_test` for every label column of ``(N, L)`` multi-label data; masked entries
    (False) are excluded per label."""
    y_arr = np.asarray(y)
    a, b = np.asarray(scores_a), np.asarray(scores_b)
    if y_arr.ndim != 2 or a.shape != y_arr.shape or b.shape != y_arr.shape:
        raise MetricInputError(
            f"Expected (N, L) targets and scores, got {y_arr.shape}, {a.shape}, {b.shape}."
        )
    m = np.ones(y_arr.shape, bool) if mask is None else np.asarray(mask, bool)
    return [delong_test(y_arr[:, j], a[:, j], b[:, j], m[:, j]) for j in range(y_arr.shape[1])]
