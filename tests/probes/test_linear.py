"""LogisticProbe against scikit-learn's LogisticRegression on real bundled data; SGD heads.

The comparisons run at the strict protocol tol 1e-12 (as scikit-learn's reference fits).
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from sklearn.datasets import load_breast_cancer, load_digits
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from embedkit.errors import NotFittedError
from embedkit.probes import DINO_LR_GRID, LogisticProbe, SGDLinearProbe, column_stats
from embedkit.probes.backends import Source

# Tolerance on probabilities vs scikit-learn: both solvers stop near the same unique optimum;
# observed max |Δp| is ~1e-5 at C = 10 on digits, 1e-7 or less at strong regularisation.
P_TOL = 1e-4


def _digits() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    X, y = load_digits(return_X_y=True)
    # Multi-label task derived from the digit: {0,1,2}, even, >= 5
    Y = np.stack([np.isin(y, [0, 1, 2]), y % 2 == 0, y >= 5], axis=1).astype(np.float32)
    return X.astype(np.float32), y, Y


def _sk(X: np.ndarray, y: np.ndarray, C: float) -> LogisticRegression:
    return LogisticRegression(C=C, max_iter=20_000, tol=1e-12).fit(X, y)


@pytest.mark.parametrize("C", [1e-4, 1e-2, 1.0, 10.0])
def test_multilabel_matches_sklearn_per_label(C: float) -> None:
    X, _, Y = _digits()
    probe = LogisticProbe(tol=1e-12, C=C).fit(X, Y)
    Xs = StandardScaler().fit_transform(X.astype(np.float64))
    ref = np.stack([_sk(Xs, Y[:, j], C).predict_proba(Xs)[:, 1] for j in range(3)], axis=1)
    assert np.abs(probe.predict_proba(X) - ref).max() < P_TOL
    assert probe.coef_.shape == (64, 3)
    assert probe.converged_.all()


@pytest.mark.parametrize("C", [1e-3, 1.0])
def test_multiclass_matches_sklearn_softmax(C: float) -> None:
    X, y, _ = _digits()
    probe = LogisticProbe(tol=1e-12, C=C).fit(X, y)
    Xs = StandardScaler().fit_transform(X.astype(np.float64))
    ref = _sk(Xs, y, C)
    assert np.abs(probe.predict_proba(X) - ref.predict_proba(Xs)).max() < P_TOL
    np.testing.assert_array_equal(probe.classes_, np.arange(10))


def test_breast_cancer_coefficients_on_raw_features() -> None:
    X, y = load_breast_cancer(return_X_y=True)
    probe = LogisticProbe(tol=1e-12, C=0.5).fit(X, y[:, None].astype(float))
    Xs = StandardScaler().fit_transform(X)
    ref = _sk(Xs, y, 0.5)
    sc = StandardScaler().fit(X)
    np.testing.assert_allclose(probe.coef_[:, 0], ref.coef_[0] / sc.scale_, rtol=1e-4, atol=1e-8)
    np.testing.assert_allclose(
        probe.decision_function(X)[:, 0], ref.decision_function(Xs), atol=1e-4
    )


def test_mask_equals_fitting_on_the_subset() -> None:
    X, _, Y = _digits()
    rng = np.random.default_rng(0)
    mask = rng.random(Y.shape) > 0.3
    Y_garbage = Y.copy()
    Y_garbage[~mask] = -1  # masked entries may hold anything
    # No standardisation: its statistics would differ between all rows and the subset.
    masked = LogisticProbe(tol=1e-12, C=0.1, standardize=False).fit(X, Y_garbage, mask=mask)
    P = masked.predict_proba(X)
    for j in range(3):
        sub = LogisticProbe(tol=1e-12, C=0.1, standardize=False).fit(
            X[mask[:, j]], Y[mask[:, j], j : j + 1]
        )
        # Unstandardised pixels are ill-conditioned: both fits stop within ~1e-5 of the optimum.
        np.testing.assert_allclose(masked.coef_[:, j], sub.coef_[:, 0], atol=5e-5)
        assert np.abs(P[:, j] - sub.predict_proba(X)[:, 0]).max() < P_TOL
    # The wrong way (masked entries as negatives) gives a clearly different model.
    as_negative = LogisticProbe(tol=1e-12, C=0.1, standardize=False).fit(X, np.where(mask, Y, 0))
    assert np.abs(as_negative.predict_proba(X) - P).max() > 0.1


def test_warm_path_equals_cold_fits_and_selection() -> None:
    X, _, Y = _digits()
    Xtr, Xva, Ytr, Yva = X[:1200], X[1200:], Y[:1200], Y[1200:]
    Cs = np.logspace(-4, 1, 8)
    probe = LogisticProbe(tol=1e-12, Cs=Cs).fit_select(Xtr, Ytr, None, Xva, Yva, None)
    path = probe.path_
    assert path.scores.shape == (8, 3)
    assert Cs[int(np.argmax(path.score))] == probe.C_
    # The path model at one C equals a cold fit at that C (validation scores agree).
    cold = LogisticProbe(tol=1e-12, C=float(Cs[3])).fit(Xtr, Ytr)
    from embedkit.eval.metrics import per_label_auroc

    np.testing.assert_allclose(
        per_label_auroc(Yva, None, cold.predict_proba(Xva)), path.scores[3], atol=1e-6
    )
    # Refit on train + val at the chosen C equals a cold fit on the concatenation.
    full = LogisticProbe(tol=1e-12, C=float(probe.C_)).fit(
        np.vstack([Xtr, Xva]), np.vstack([Ytr, Yva])
    )
    assert np.abs(full.predict_proba(X) - probe.predict_proba(X)).max() < P_TOL


def test_per_label_selection_picks_each_labels_best() -> None:
    X, _, Y = _digits()
    Cs = np.logspace(-4, 1, 6)
    probe = LogisticProbe(tol=1e-12, Cs=Cs, select="per_label")
    probe.fit_select(X[:1200], Y[:1200], None, X[1200:], Y[1200:], None)
    expected = Cs[np.nanargmax(probe.path_.scores, axis=0)]
    np.testing.assert_array_equal(probe.C_, expected)


def test_fit_without_C_holds_out_ten_percent() -> None:
    X, y, _ = _digits()
    probe = LogisticProbe(tol=1e-12, Cs=np.logspace(-3, 0, 4)).fit(X, y)
    assert probe.path_.metric == "accuracy"
    assert (probe.predict_proba(X).argmax(1) == y).mean() > 0.95


def test_float16_streamed_equals_float32_resident() -> None:
    X, _, Y = _digits()
    X16 = X.astype(np.float16)  # digits are small integers: exact in float16
    a = LogisticProbe(tol=1e-12, C=1.0, dtype="float32").fit(X16, Y)
    b = LogisticProbe(tol=1e-12, C=1.0, dtype=torch.float32, max_resident_bytes=0).fit(X, Y)
    np.testing.assert_allclose(a.predict_proba(X), b.predict_proba(X), atol=1e-4)


def test_column_stats_by_blocks_from_float16() -> None:
    rng = np.random.default_rng(0)
    X = (rng.normal(size=(1000, 7)) * 3 + 50).astype(np.float16)
    for rows in (1, 64, 333, 5000):
        mean, std = column_stats([Source(X)], block_rows=rows)
        np.testing.assert_allclose(mean, X.astype(np.float64).mean(0), rtol=1e-12)
        np.testing.assert_allclose(std, X.astype(np.float64).std(0), rtol=1e-9)


def test_not_fitted_and_bad_input() -> None:
    with pytest.raises(NotFittedError):
        LogisticProbe().predict_proba(np.zeros((2, 3), np.float32))
    assert not hasattr(LogisticProbe(), "coef_")
    X, _, Y = _digits()
    Y[:, 0] = 0
    with pytest.raises(ValueError, match="single class"):
        LogisticProbe(tol=1e-12, C=1.0).fit(X, Y)


def test_sgd_heads_learn_digits_and_pick_from_grid(caplog: pytest.LogCaptureFixture) -> None:
    X, y, _ = _digits()
    caplog.set_level(logging.WARNING)
    probe = SGDLinearProbe(epochs=10, standardize=True).fit_select(
        X[:1300], y[:1300], None, X[1300:], y[1300:], None
    )
    assert probe.lr_ in DINO_LR_GRID
    assert len(probe.val_scores_) == len(DINO_LR_GRID)
    assert max(probe.val_scores_.values()) == probe.val_scores_[probe.lr_]
    assert (
        probe.predict_proba(X[1300:]).argmax(1) == y[1300:]
    ).mean() > 0.85  # logistic probe: ~0.9


def _embedding_like(n: int, d: int, labels: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Decaying spectrum after a random rotation, non-zero mean: ill-conditioned like embeddings."""
    rng = np.random.default_rng(seed)
    basis = np.linalg.qr(rng.normal(size=(d, d)))[0]
    z = (rng.normal(size=(n, d)) * np.arange(1, d + 1) ** -0.8) @ basis.T
    W = rng.normal(size=(d, labels)) * (rng.random((d, labels)) < 0.2)
    y = (rng.random((n, labels)) < 1 / (1 + np.exp(-(z @ W * 4.0 - 1.0)))).astype(np.float32)
    return (z * 3.0 + rng.normal(size=d)).astype(np.float32), y


@pytest.mark.parametrize("C", [1e-3, 1.0, 100.0])
def test_embedding_like_multilabel_matches_sklearn(C: float) -> None:
    X, Y = _embedding_like(1500, 48, 3)
    probe = LogisticProbe(tol=1e-12, C=C).fit(X, Y)
    Xs = StandardScaler().fit_transform(X.astype(np.float64))
    ref = np.stack([_sk(Xs, Y[:, j], C).predict_proba(Xs)[:, 1] for j in range(3)], axis=1)
    assert np.abs(probe.predict_proba(X) - ref).max() < P_TOL
    assert probe.converged_.all()


def test_preconditioner_reaches_the_same_optimum_in_fewer_iterations() -> None:
    X, Y = _embedding_like(2000, 64, 4, seed=1)
    for C in (1e-2, 10.0):
        plain = LogisticProbe(tol=1e-12, C=C, precondition=False, solver="lbfgs").fit(X, Y)
        pre = LogisticProbe(tol=1e-12, C=C, precondition=True, solver="lbfgs").fit(X, Y)
        assert np.abs(plain.predict_proba(X) - pre.predict_proba(X)).max() < 1e-5
        assert pre.n_iter_.sum() * 3 < plain.n_iter_.sum()
    with pytest.raises(ValueError, match="precondition"):
        LogisticProbe(tol=1e-12, C=1.0, precondition="yes").fit(X, Y)  # type: ignore[arg-type]


def test_preconditioned_multiclass_and_unstandardised_match_sklearn() -> None:
    X, y, _ = _digits()
    Xs = StandardScaler().fit_transform(X.astype(np.float64))
    probe = LogisticProbe(tol=1e-12, C=0.1, precondition=True).fit(X, y)
    assert np.abs(probe.predict_proba(X) - _sk(Xs, y, 0.1).predict_proba(Xs)).max() < P_TOL
    Xe, Y = _embedding_like(1000, 32, 2, seed=2)
    raw = LogisticProbe(tol=1e-12, C=0.5, standardize=False, precondition=True).fit(Xe, Y)
    ref = np.stack(
        [_sk(Xe.astype(np.float64), Y[:, j], 0.5).predict_proba(Xe)[:, 1] for j in range(2)], 1
    )
    assert np.abs(raw.predict_proba(Xe) - ref).max() < P_TOL


@pytest.mark.parametrize("C", [1e-2, 1.0])
def test_above_2048_features_low_rank_preconditioner_matches_sklearn(C: float) -> None:
    # 2,304 > 2,048 features: the randomized low-rank spectrum preconditions L-BFGS; the
    # features are float16 (stored form), converted by blocks, standardisation folded in.
    X, Y = _embedding_like(600, 2304, 2, seed=3)
    X16 = X.astype(np.float16)
    probe = LogisticProbe(tol=1e-12, C=C).fit(X16, Y)
    Xs = StandardScaler().fit_transform(X16.astype(np.float64))
    ref = np.stack([_sk(Xs, Y[:, j], C).predict_proba(Xs)[:, 1] for j in range(2)], axis=1)
    assert np.abs(probe.predict_proba(X16) - ref).max() < P_TOL
    assert probe.converged_.all()
    assert probe.n_iter_.max() < 100  # unpreconditioned: several hundred at C = 1
