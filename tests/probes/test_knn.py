"""KNNProbe against a brute-force reference and scikit-learn's neighbours."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.datasets import load_digits
from sklearn.neighbors import NearestNeighbors

from embedkit.errors import NotFittedError
from embedkit.probes import KNNProbe


def _reference(
    Xtr: np.ndarray, y: np.ndarray, mask: np.ndarray, Xq: np.ndarray, k: int, T: float
) -> np.ndarray:
    """Brute force: full similarity matrix, lexsort (sim desc, index asc), weighted vote."""
    a = Xtr / np.linalg.norm(Xtr, axis=1, keepdims=True)
    q = Xq / np.linalg.norm(Xq, axis=1, keepdims=True)
    sims = q @ a.T
    out = np.empty((Xq.shape[0], y.shape[1]))
    prev = (y * mask).sum(0) / mask.sum(0)
    for i in range(Xq.shape[0]):
        order = np.lexsort((np.arange(a.shape[0]), -sims[i]))[:k]
        w = np.exp(sims[i, order] / T)
        valid = mask[order]
        tot = (w[:, None] * valid).sum(0)
        out[i] = np.where(
            tot > 0, (w[:, None] * valid * y[order]).sum(0) / np.maximum(tot, 1e-300), prev
        )
    return out


def _tied(rng: np.random.Generator, n: int) -> np.ndarray:
    """Rows with four entries of ±1 (norm exactly 2): cosine similarities are multiples of 1/4,
    computed exactly in any summation order, so there are many exact ties."""
    X = np.zeros((n, 16))
    for row in X:
        row[rng.choice(16, 4, replace=False)] = rng.choice([-1.0, 1.0], 4)
    return X


def test_multilabel_scores_equal_bruteforce_with_ties_and_masks() -> None:
    rng = np.random.default_rng(0)
    Xtr = _tied(rng, 300)
    y = (rng.random((300, 3)) < 0.4).astype(float)
    mask = rng.random((300, 3)) > 0.3
    Xq = _tied(rng, 40)
    Xq[:10] = Xtr[:10]  # queries with exact duplicates
    for k in (1, 10, 37):
        probe = KNNProbe(k=k, dtype="float64", block_size=7, train_block_size=50).fit(
            Xtr, y, mask=mask
        )
        np.testing.assert_allclose(
            probe.predict_proba(Xq, k=k), _reference(Xtr, y, mask, Xq, k, 0.07), atol=1e-10
        )


def test_tie_break_is_lower_index_and_block_size_invariant() -> None:
    rng = np.random.default_rng(1)
    Xtr = _tied(rng, 500)
    y = np.zeros((500, 1))
    Xq = _tied(rng, 25)
    results = []
    for qb, tb in ((1, 3), (25, 500), (8, 64)):
        probe = KNNProbe(k=20, dtype="float64", block_size=qb, train_block_size=tb).fit(Xtr, y)
        results.append(probe.kneighbors(Xq, 20))
    for sims, idx in results[1:]:
        np.testing.assert_array_equal(idx, results[0][1])
        np.testing.assert_array_equal(sims, results[0][0])
    sims, idx = results[0]
    for i in range(25):  # within equal similarity, indices ascend
        for j in range(19):
            if sims[i, j] == sims[i, j + 1]:
                assert idx[i, j] < idx[i, j + 1]


def test_neighbours_equal_sklearn_cosine_brute_on_digits() -> None:
    X, y = load_digits(return_X_y=True)
    X = X + 0.01 * np.random.default_rng(0).normal(size=X.shape)  # break exact duplicates
    Xtr, Xq = X[:1500], X[1500:]
    probe = KNNProbe(k=(10, 20), dtype="float64").fit(Xtr, y[:1500])
    sims, idx = probe.kneighbors(Xq, 20)
    nn = NearestNeighbors(n_neighbors=20, metric="cosine", algorithm="brute").fit(Xtr)
    dist, ref_idx = nn.kneighbors(Xq)
    np.testing.assert_array_equal(idx, ref_idx)
    np.testing.assert_allclose(1.0 - sims, dist, atol=1e-10)
    scores = probe.predict_proba_per_k(Xq)
    assert set(scores) == {10, 20}
    np.testing.assert_array_equal(probe.predict_proba(Xq, k=20), scores[20])
    np.testing.assert_array_equal(probe.predict_proba(Xq), scores[10])  # the smallest k
    assert (probe.classes_[scores[20].argmax(1)] == y[1500:]).mean() > 0.9
    np.testing.assert_allclose(scores[10].sum(1), 1.0)


def test_float16_input_gives_same_neighbours() -> None:
    X, y = load_digits(return_X_y=True)
    X = X + np.random.default_rng(0).normal(size=X.shape)
    a = KNNProbe(k=10).fit(X[:1500].astype(np.float32), y[:1500])
    b = KNNProbe(k=10).fit(X[:1500].astype(np.float16), y[:1500])
    sa, ia = a.kneighbors(X[1500:].astype(np.float32))
    sb, ib = b.kneighbors(X[1500:].astype(np.float16))
    assert (ia == ib).mean() > 0.95  # float16 rounding may swap near-ties
    np.testing.assert_allclose(sa, sb, atol=2e-3)


def test_not_fitted() -> None:
    with pytest.raises(NotFittedError):
        KNNProbe().predict_proba(np.ones((1, 3)))


def test_resident_and_streamed_training_blocks_agree_with_boundary_ties() -> None:
    rng = np.random.default_rng(3)
    Xtr = _tied(rng, 400)
    Xq = _tied(rng, 30)
    y = (rng.random((400, 2)) < 0.5).astype(float)
    kwargs = {"k": 15, "dtype": "float64", "block_size": 9, "train_block_size": 70}
    a = KNNProbe(**kwargs).fit(Xtr, y)  # type: ignore[arg-type]
    b = KNNProbe(**kwargs, max_resident_bytes=0).fit(Xtr, y)  # type: ignore[arg-type]
    sa, ia = a.kneighbors(Xq)
    sb, ib = b.kneighbors(Xq)
    np.testing.assert_array_equal(ia, ib)
    np.testing.assert_array_equal(sa, sb)
    np.testing.assert_allclose(
        a.predict_proba(Xq, k=15), _reference(Xtr, y, np.ones_like(y, bool), Xq, 15, 0.07),
        atol=1e-10,
    )  # fmt: skip
