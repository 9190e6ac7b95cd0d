"""Probe backends: scikit-learn (CPU reference) against torch; cuML on a GPU (marked ``gpu``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from embedkit.errors import BackendUnavailableError, EmbedkitError
from embedkit.eval.metrics import ovr_macro_auroc, per_label_auroc
from embedkit.probes import KNNProbe, LogisticProbe
from embedkit.probes.external import import_cuml

CS = np.logspace(-4, 2, 7)


def _digits() -> tuple[np.ndarray, ...]:
    X, y = load_digits(return_X_y=True)
    perm = np.random.default_rng(0).permutation(len(y))
    X, y = X[perm].astype(np.float32), y[perm]
    Y = np.stack([np.isin(y, [0, 1, 2]), y % 2 == 0, y >= 5], axis=1).astype(np.float32)
    mask = np.random.default_rng(1).random(Y.shape) > 0.1
    return X[:1400], y[:1400], Y[:1400], mask[:1400], X[1400:], y[1400:], Y[1400:]


def test_sklearn_backend_same_protocol_as_torch_multiclass() -> None:
    X, y, _, _, Xte, yte, _ = _digits()
    ref = LogisticProbe(Cs=CS, backend="sklearn", tol=1e-10).fit(X, y)
    ours = LogisticProbe(Cs=CS, tol=1e-10).fit(X, y)
    assert ref.C_ == ours.C_
    np.testing.assert_allclose(ref.path_.score, ours.path_.score, atol=1e-3)
    assert np.abs(ref.predict_proba(Xte) - ours.predict_proba(Xte)).max() < 1e-4
    a = ovr_macro_auroc(yte, ref.predict_proba(Xte), None)
    b = ovr_macro_auroc(yte, ours.predict_proba(Xte), None)
    assert abs(a - b) <= 1e-4


def test_sklearn_backend_masked_multilabel_and_binary_softmax() -> None:
    X, y, Y, mask, Xte, _, Yte = _digits()
    ref = LogisticProbe(C=0.3, backend="sklearn", tol=1e-10).fit(X, Y, mask=mask)
    ours = LogisticProbe(C=0.3, tol=1e-10).fit(X, Y, mask=mask)
    assert np.abs(ref.predict_proba(Xte) - ours.predict_proba(Xte)).max() < 1e-4
    a = per_label_auroc(Yte, None, ref.predict_proba(Xte))
    np.testing.assert_allclose(a, per_label_auroc(Yte, None, ours.predict_proba(Xte)), atol=1e-4)
    assert ref.n_iter_.shape == (3,) and ref.converged_.all()
    # Two classes as a softmax: scikit-learn's sigmoid at 2C is the same optimum.
    yb = (y >= 5).astype(int)
    p_ref = LogisticProbe(C=0.3, backend="sklearn", tol=1e-10).fit(X, yb).predict_proba(Xte)
    p_ours = LogisticProbe(C=0.3, tol=1e-10).fit(X, yb).predict_proba(Xte)
    assert np.abs(p_ref - p_ours).max() < 1e-4


def test_sklearn_knn_backend_same_neighbours_and_scores() -> None:
    X, _, Y, mask, Xte, _, _ = _digits()
    ref = KNNProbe(k=(5, 20), backend="sklearn", dtype="float64").fit(X, Y, mask=mask)
    ours = KNNProbe(k=(5, 20), dtype="float64").fit(X, Y, mask=mask)
    s_ref, i_ref = ref.kneighbors(Xte[:50], 5)
    s_ours, i_ours = ours.kneighbors(Xte[:50], 5)
    np.testing.assert_allclose(s_ref, s_ours, atol=1e-6)
    assert (i_ref == i_ours).mean() > 0.99  # only exact ties may order differently
    for k in (5, 20):
        np.testing.assert_allclose(
            ref.predict_proba(Xte, k=k), ours.predict_proba(Xte, k=k), atol=1e-6
        )


def test_invalid_backend_and_missing_cuml() -> None:
    X, y, *_ = _digits()
    with pytest.raises(ValueError, match="backend"):
        LogisticProbe(C=1.0, backend="jax").fit(X, y)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="backend"):
        KNNProbe(k=5, backend="faiss").fit(X, y).predict_proba(X[:3])  # type: ignore[arg-type]
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the missing-CUDA message is not reachable")
    with pytest.raises(BackendUnavailableError, match="CUDA") as err:
        LogisticProbe(C=1.0, backend="cuml").fit(X, y)
    assert isinstance(err.value, EmbedkitError)
    with pytest.raises(BackendUnavailableError, match="backend='torch'"):
        KNNProbe(k=5, backend="cuml").fit(X, y).predict_proba(X[:3])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuml_backend_matches_torch_on_gpu() -> None:
    import_cuml()
    X, y, Y, mask, Xte, yte, _ = _digits()
    cu = LogisticProbe(Cs=CS, backend="cuml", tol=1e-8).fit(X, y)
    th = LogisticProbe(Cs=CS, device="cuda", tol=1e-8).fit(X, y)
    assert cu.C_ == th.C_
    a = ovr_macro_auroc(yte, cu.predict_proba(Xte), None)
    assert abs(a - ovr_macro_auroc(yte, th.predict_proba(Xte), None)) <= 1e-3
    cu_ml = LogisticProbe(C=0.3, backend="cuml", tol=1e-8).fit(X, Y, mask=mask)
    th_ml = LogisticProbe(C=0.3, device="cuda", tol=1e-8).fit(X, Y, mask=mask)
    assert np.abs(cu_ml.predict_proba(Xte) - th_ml.predict_proba(Xte)).max() < 1e-3
    kc = KNNProbe(k=(5, 20), backend="cuml").fit(X, Y, mask=mask)
    kt = KNNProbe(k=(5, 20), device="cuda").fit(X, Y, mask=mask)
    np.testing.assert_allclose(kc.predict_proba(Xte), kt.predict_proba(Xte), atol=1e-3)
