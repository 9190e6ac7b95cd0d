"""Newton-CG (the small-D solver) against scikit-learn and against the L-BFGS solver."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.preprocessing import StandardScaler

import embedkit.probes.linear as linear_module
from embedkit.eval.metrics import ovr_macro_auroc, per_label_auroc
from embedkit.probes import LogisticProbe
from embedkit.probes.backends import compute_threads
from embedkit.probes.linear import DEFAULT_TOL

P_TOL = 1e-4
AUROC_TOL = 1e-4
CS = np.logspace(-6, 5, 12)  # the DINOv2 range, fewer points: the tests stay fast


def _digits_split() -> tuple[np.ndarray, ...]:
    X, y = load_digits(return_X_y=True)
    rng = np.random.default_rng(0)
    perm = rng.permutation(len(y))
    X, y = X[perm].astype(np.float32), y[perm]
    return X[:1400], y[:1400], X[1400:], y[1400:]


def _multilabel(y: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    Y = np.stack([np.isin(y, [0, 1, 2]), y % 2 == 0, y >= 5, y == 7], axis=1).astype(np.float32)
    mask = np.random.default_rng(seed).random(Y.shape) > 0.1  # 10% uncertain entries
    return np.where(mask, Y, -1.0).astype(np.float32), mask


def _sk(X: np.ndarray, y: np.ndarray, C: float) -> LogisticRegression:
    return LogisticRegression(C=C, max_iter=20_000, tol=1e-12).fit(X, y)


@pytest.mark.parametrize("C", [1e-4, 1.0, 1e3])
def test_newton_multiclass_matches_sklearn(C: float) -> None:
    X, y, _, _ = _digits_split()
    probe = LogisticProbe(C=C, solver="newton", tol=1e-12).fit(X, y)
    Xs = StandardScaler().fit_transform(X.astype(np.float64))
    ref = _sk(Xs, y, C).predict_proba(Xs)
    assert np.abs(probe.predict_proba(X) - ref).max() < P_TOL
    assert probe.converged_.all()
    assert probe.n_iter_.max() < 40  # L-BFGS: hundreds at C = 1e3


@pytest.mark.parametrize("C", [1e-3, 1.0, 1e3])
def test_newton_masked_multilabel_matches_sklearn_on_valid_entries(C: float) -> None:
    X, y, _, _ = _digits_split()
    Y, mask = _multilabel(y, seed=1)
    probe = LogisticProbe(C=C, solver="newton", tol=1e-12).fit(X, Y, mask=mask)
    Xs = StandardScaler().fit_transform(X.astype(np.float64))
    P = probe.predict_proba(X)
    for j in range(Y.shape[1]):
        m = mask[:, j]
        ref = _sk(Xs[m], Y[m, j], C).predict_proba(Xs)[:, 1]
        # scikit-learn fits on the valid rows only: same objective as the masked label.
        assert np.abs(P[:, j] - ref).max() < P_TOL
    assert probe.converged_.all()


def test_spectral_preconditioned_newton_matches_exact_blocks(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    X, y, _, _ = _digits_split()
    exact = LogisticProbe(C=10.0, solver="newton", tol=1e-12).fit(X, y)
    monkeypatch.setattr(linear_module, "EXACT_BLOCKS_MAX_FEATURES", 0)
    spectral = LogisticProbe(C=10.0, solver="newton", tol=1e-12).fit(X, y)
    assert np.abs(exact.predict_proba(X) - spectral.predict_proba(X)).max() < 1e-6
    assert spectral.converged_.all()


def _sk_protocol(
    Xtr: np.ndarray, ytr: np.ndarray, Xva: np.ndarray, yva: np.ndarray, Xte: np.ndarray
) -> tuple[float, np.ndarray]:
    """scikit-learn at tol 1e-12 through the same protocol: accuracy on validation per C,
    smallest best C, refit on train + val; (chosen C, test probabilities)."""
    sc = StandardScaler().fit(Xtr.astype(np.float64))
    accs = [(_sk(sc.transform(Xtr), ytr, C).predict(sc.transform(Xva)) == yva).mean() for C in CS]
    C = float(CS[int(np.argmax(accs))])
    Xall, yall = np.vstack([Xtr, Xva]).astype(np.float64), np.concatenate([ytr, yva])
    sc = StandardScaler().fit(Xall)
    return C, _sk(sc.transform(Xall), yall, C).predict_proba(sc.transform(Xte))


def test_newton_path_multiclass_same_choice_and_auroc_as_lbfgs_and_sklearn() -> None:
    X, y, Xte, yte = _digits_split()
    Xtr, ytr, Xva, yva = X[:1200], y[:1200], X[1200:], y[1200:]
    newton = LogisticProbe(Cs=CS, solver="newton", tol=1e-12).fit_select(
        Xtr, ytr, None, Xva, yva, None
    )
    lbfgs = LogisticProbe(Cs=CS, solver="lbfgs", tol=1e-12).fit_select(
        Xtr, ytr, None, Xva, yva, None
    )
    assert newton.C_ == lbfgs.C_
    np.testing.assert_allclose(newton.path_.score, lbfgs.path_.score, atol=1e-12)
    a_newton = ovr_macro_auroc(yte, newton.predict_proba(Xte), None)
    a_lbfgs = ovr_macro_auroc(yte, lbfgs.predict_proba(Xte), None)
    assert abs(a_newton - a_lbfgs) <= AUROC_TOL
    C_sk, p_sk = _sk_protocol(Xtr, ytr, Xva, yva, Xte)
    assert C_sk == newton.C_
    assert abs(a_newton - roc_auc_score(yte, p_sk, multi_class="ovr")) <= AUROC_TOL


def test_newton_path_masked_multilabel_same_choice_and_auroc_as_lbfgs() -> None:
    X, y, Xte, yte = _digits_split()
    Y, mask = _multilabel(y, seed=2)
    Yte, mte = _multilabel(yte, seed=3)
    kw: dict[str, Any] = {"Cs": CS, "select": "per_label", "tol": 1e-12}
    newton = LogisticProbe(solver="newton", **kw).fit(X, Y, mask=mask)
    lbfgs = LogisticProbe(solver="lbfgs", **kw).fit(X, Y, mask=mask)
    np.testing.assert_array_equal(newton.C_, lbfgs.C_)
    a_newton = per_label_auroc(Yte, mte, newton.predict_proba(Xte))
    a_lbfgs = per_label_auroc(Yte, mte, lbfgs.predict_proba(Xte))
    assert np.abs(a_newton - a_lbfgs).max() <= AUROC_TOL


def test_auto_solver_and_invalid_solver() -> None:
    X, y, _, _ = _digits_split()
    auto = LogisticProbe(C=1.0).fit(X, y)
    newton = LogisticProbe(C=1.0, solver="newton").fit(X, y)
    np.testing.assert_array_equal(auto.n_iter_, newton.n_iter_)  # 64 features: Newton
    with pytest.raises(ValueError, match="solver"):
        LogisticProbe(C=1.0, solver="cg").fit(X, y)  # type: ignore[arg-type]


def test_default_tol_same_choice_and_auroc_as_strict_protocol() -> None:
    X, y, Xte, yte = _digits_split()
    Y, mask = _multilabel(y, seed=4)
    Yte, mte = _multilabel(yte, seed=5)
    default = LogisticProbe().fit(X, Y, mask=mask)
    strict = LogisticProbe(tol=1e-12).fit(X, Y, mask=mask)
    assert default.tol == DEFAULT_TOL > 1e-12
    assert default.C_ == strict.C_
    a = np.nanmean(per_label_auroc(Yte, mte, default.predict_proba(Xte)))
    b = np.nanmean(per_label_auroc(Yte, mte, strict.predict_proba(Xte)))
    assert abs(a - b) <= AUROC_TOL
    assert default.path_.n_iter.sum() < strict.path_.n_iter.sum()


def test_compute_threads_small_problems_on_one_thread_and_restored() -> None:
    before = torch.get_num_threads()
    with compute_threads(None, 1000) as n:
        assert n == 1 == torch.get_num_threads()
    with compute_threads(None, 2**30) as n:
        assert n == before
    with compute_threads(2, 10) as n:
        assert n == 2 == torch.get_num_threads()
    assert torch.get_num_threads() == before
    with pytest.raises(ValueError, match="n_threads"), compute_threads(0, 10):
        pass
