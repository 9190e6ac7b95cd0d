"""Paired permutation test of the difference in (macro) AUROC between two models.

Under the null hypothesis the two models' scores of a test image are exchangeable. Each
permutation swaps, for a random half of the images, model A's score with model B's; the p-value
is the share of permutations whose absolute macro-AUROC difference is at least the observed one
(with the usual +1 so that p > 0). The scores are replaced by their per-model ranks within each
label first (AUROC depends on ranks only, so the observed difference is unchanged), which makes
two models with different score scales (a kNN vote and a logistic probability) exchangeable in
the first place.

Why this test and not the paired bootstrap for the report's p-values: with a rare label (a few
positives in the test set) the bootstrap cannot create new positives, its replicates vary too
little, and the bootstrap p-value rejects a true null far more often than α; the permutation test
holds α whatever the label frequencies (simulation: ``benchmarks/sim_statistics.py``, figures in
``docs/statistics.md``).

Computation: per label, both models' scores become mid-ranks once (doubled, so ties give
integers). A permutation only chooses which of the two ranks of each image is "A's", so the
mid-ranks within the permuted vector come from a cumulative histogram over the integer grid: O(n)
per permutation and label with no sorting, vectorised over blocks of permutations.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy.stats import rankdata

from embedkit.errors import BootstrapError

__all__ = ["PermutationTest", "paired_permutation_test"]

#: Elements of one (permutations x 2n) block; bounds the memory of a block to ~100 MB.
_BLOCK_ELEMENTS = 2_000_000


class PermutationTest(NamedTuple):
    """Observed difference A - B of the macro AUROC and its two-sided permutation p-value."""

    delta: float
    p_value: float
    n_perm: int
    n_labels: int  # labels with both classes among their valid entries (the macro's labels)


def paired_permutation_test(
    y: ArrayLike,
    mask: ArrayLike | None,
    scores_a: ArrayLike,
    scores_b: ArrayLike,
    n_perm: int = 2000,
    seed: int = 0,
) -> PermutationTest:
    """Two-sided paired permutation test of macro AUROC(A) - macro AUROC(B).

    ``y`` is ``(N, L)`` 0/1 (multi-label; ``mask`` marks the valid entries) or ``(N,)`` class
    ids with ``(N, K)`` scores (multi-class: one-vs-rest macro AUROC). The swaps depend only on
    ``N``, ``n_perm`` and ``seed``.
    """
    pos, valid, sa, sb = _columns(y, mask, scores_a, scores_b)
    if n_perm < 1:
        raise BootstrapError(f"Expected n_perm >= 1, got {n_perm} instead.")
    keep = [j for j in range(pos.shape[1]) if pos[valid[:, j], j].any()]
    keep = [j for j in keep if (~pos[valid[:, j], j]).any()]
    if not keep:
        return PermutationTest(float("nan"), float("nan"), n_perm, 0)
    n = pos.shape[0]
    rng = np.random.default_rng(seed)
    diffs = np.zeros(n_perm)
    observed = 0.0
    block = max(1, _BLOCK_ELEMENTS // (2 * n))
    starts = range(0, n_perm, block)
    flips = [rng.random((min(block, n_perm - lo), n)) < 0.5 for lo in starts]
    for j in keep:
        rows = np.flatnonzero(valid[:, j])
        label = _Label(pos[rows, j], rankdata(sa[rows, j]), rankdata(sb[rows, j]))
        observed += label.auroc_a - label.auroc_b
        for lo, swap in zip(starts, flips, strict=True):
            diffs[lo : lo + swap.shape[0]] += label.permuted_difference(swap[:, rows])
    observed /= len(keep)
    diffs /= len(keep)
    tol = 1e-12 * max(1.0, abs(observed))
    extreme = int(np.sum(np.abs(diffs) >= abs(observed) - tol))
    return PermutationTest(observed, (1 + extreme) / (n_perm + 1), n_perm, len(keep))


class _Label:
    """One label's valid entries: which are positive, and both models' doubled mid-ranks
    (integers in [2, 2m], so a permuted vector's ranks are a cumulative histogram)."""

    def __init__(self, pos: NDArray[np.bool_], ranks_a: NDArray[Any], ranks_b: NDArray[Any]):
        self.m = pos.size
        self.pos_rows = np.flatnonzero(pos)
        self.n_pos = float(self.pos_rows.size)
        self.n_neg = float(self.m - self.n_pos)
        self.a = np.rint(2 * ranks_a).astype(np.int64)
        self.b = np.rint(2 * ranks_b).astype(np.int64)
        self.pool_counts = np.bincount(np.r_[self.a, self.b], minlength=2 * self.m + 1)
        self.pool_cum = np.cumsum(self.pool_counts)
        self.auroc_a = self._auroc(ranks_a)
        self.auroc_b = self._auroc(ranks_b)

    def _auroc(self, ranks: NDArray[Any]) -> float:
        r = float(rankdata(ranks)[self.pos_rows].sum())
        return (r - self.n_pos * (self.n_pos + 1) / 2) / (self.n_pos * self.n_neg)

    def permuted_difference(self, swap: NDArray[np.bool_]) -> NDArray[Any]:
        """AUROC(A') - AUROC(B') for each row of ``swap`` (True: the image's scores swapped).

        A' and B' together always hold every pooled rank once, so B's histogram is the pool's
        minus A's: one histogram per permutation serves both models.
        """
        n_perm, width = swap.shape[0], 2 * self.m + 1
        values_a = np.where(swap, self.b, self.a)
        offsets = (np.arange(n_perm, dtype=np.int64) * width)[:, None]
        counts_a = np.bincount((values_a + offsets).ravel(), minlength=n_perm * width)
        counts_a = counts_a.reshape(n_perm, width)
        cum_a = np.cumsum(counts_a, axis=1)
        counts_b = self.pool_counts[None, :] - counts_a
        cum_b = self.pool_cum[None, :] - cum_a
        swap_pos = swap[:, self.pos_rows]
        at_a = np.where(swap_pos, self.b[self.pos_rows], self.a[self.pos_rows])
        at_b = np.where(swap_pos, self.a[self.pos_rows], self.b[self.pos_rows])
        difference: NDArray[Any] = self._from_histogram(
            cum_a, counts_a, at_a
        ) - self._from_histogram(cum_b, counts_b, at_b)
        return difference

    def _from_histogram(
        self, cum: NDArray[Any], counts: NDArray[Any], at_pos: NDArray[np.int64]
    ) -> NDArray[Any]:
        """AUROC per permutation from the cumulative histogram of the permuted ranks and the
        ranks of the positives (mid-rank = values below + (values equal + 1) / 2)."""
        at_counts = np.take_along_axis(counts, at_pos, axis=1)
        below = np.take_along_axis(cum, at_pos, axis=1) - at_counts
        rank_sum = (below + (at_counts + 1) / 2).sum(axis=1)
        return np.asarray(
            (rank_sum - self.n_pos * (self.n_pos + 1) / 2) / (self.n_pos * self.n_neg)
        )


def _columns(
    y: ArrayLike, mask: ArrayLike | None, scores_a: ArrayLike, scores_b: ArrayLike
) -> tuple[NDArray[np.bool_], NDArray[np.bool_], NDArray[Any], NDArray[Any]]:
    """(positive, valid, scores A, scores B) as (N, L) columns; multi-class becomes one-vs-rest."""
    y_arr = np.asarray(y)
    sa = np.asarray(scores_a, dtype=np.float64)
    sb = np.asarray(scores_b, dtype=np.float64)
    if sa.shape != sb.shape or sa.shape[0] != y_arr.shape[0]:
        raise BootstrapError(
            f"Expected two score arrays of one shape with {y_arr.shape[0]} rows, got {sa.shape} "
            f"and {sb.shape} instead."
        )
    if y_arr.ndim == 1 and sa.ndim == 2 and sa.shape[1] > 1:  # class ids, (N, K) scores
        rows_valid = np.ones(y_arr.shape[0], bool) if mask is None else np.asarray(mask, bool)
        pos = y_arr[:, None] == np.arange(sa.shape[1])[None, :]
        valid = np.repeat(rows_valid.reshape(-1, 1), sa.shape[1], axis=1)
        return pos, valid, sa, sb
    y2 = y_arr.reshape(y_arr.shape[0], -1)
    sa, sb = sa.reshape(y2.shape), sb.reshape(y2.shape)
    valid = np.ones(y2.shape, bool) if mask is None else np.asarray(mask, bool).reshape(y2.shape)
    return y2 == 1, valid, sa, sb
