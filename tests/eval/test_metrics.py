"""Metrics against scikit-learn, with ties, masks and labels lacking a class."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

from embedkit.eval import metrics as M


def _data(seed: int = 0, n: int = 300, labels: int = 5) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(seed)
    y = (rng.random((n, labels)) < 0.3).astype(np.float32)
    scores = np.round(y * 0.7 + rng.normal(size=(n, labels)), 1)  # rounding creates ties
    mask = rng.random((n, labels)) > 0.2
    return y, mask, scores


def test_auroc_and_ap_equal_sklearn_with_ties_and_masks() -> None:
    y, mask, s = _data()
    auc = M.per_label_auroc(y, mask, s)
    ap = M.per_label_ap(y, mask, s)
    for j in range(y.shape[1]):
        m = mask[:, j]
        assert auc[j] == pytest.approx(roc_auc_score(y[m, j], s[m, j]), abs=1e-12)
        assert ap[j] == pytest.approx(average_precision_score(y[m, j], s[m, j]), abs=1e-12)


def test_masked_entries_are_ignored_even_with_garbage_targets() -> None:
    y, mask, s = _data(1)
    y2 = y.copy()
    y2[~mask] = -1  # uncertain entries: any value, they must not count
    s2 = s.copy()
    s2[~mask] = 99.0
    np.testing.assert_allclose(M.per_label_auroc(y2, mask, s2), M.per_label_auroc(y, mask, s))


def test_label_without_both_classes_is_nan_and_excluded_from_macro() -> None:
    y, mask, s = _data(2)
    y[:, 1] = 0
    auc = M.per_label_auroc(y, mask, s)
    assert np.isnan(auc[1])
    assert M.macro_auroc(y, mask, s) == pytest.approx(np.mean(np.delete(auc, 1)))
    report = M.evaluate_multilabel(y, mask, s, [f"l{j}" for j in range(5)])
    assert report["excluded_labels"] == ["l1"]
    assert M.labels_without_both_classes(y, mask).tolist() == [1]


def test_weighted_columns_equal_auroc_of_resampled_rows() -> None:
    y, mask, s = _data(3, n=120, labels=3)
    rng = np.random.default_rng(0)
    idx = rng.integers(0, 120, size=(7, 120))
    counts = np.stack([np.bincount(i, minlength=120) for i in idx]).astype(float)
    fast = M.auroc_columns(y, mask, s, counts)
    for b in range(7):
        np.testing.assert_allclose(fast[b], M.per_label_auroc(y[idx[b]], mask[idx[b]], s[idx[b]]))


def test_multiclass_metrics_equal_sklearn() -> None:
    from sklearn.metrics import accuracy_score, balanced_accuracy_score

    rng = np.random.default_rng(4)
    y = rng.integers(0, 4, 400)
    logits = rng.normal(size=(400, 4)) + np.eye(4)[y]
    proba = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    assert M.accuracy(y, proba) == pytest.approx(accuracy_score(y, proba.argmax(1)))
    assert M.balanced_accuracy(y, proba) == pytest.approx(
        balanced_accuracy_score(y, proba.argmax(1))
    )
    assert M.ovr_macro_auroc(y, proba) == pytest.approx(
        roc_auc_score(y, proba, multi_class="ovr", average="macro"), abs=1e-12
    )
    mask = rng.random(400) > 0.3
    assert M.accuracy(y, proba, mask) == pytest.approx(
        accuracy_score(y[mask], proba[mask].argmax(1))
    )


def test_youden_matches_roc_curve() -> None:
    y, mask, s = _data(5, labels=1)
    thr, sens, spec = M.youden(y[:, 0], s[:, 0], mask[:, 0])
    m = mask[:, 0]
    fpr, tpr, thresholds = roc_curve(y[m, 0], s[m, 0], drop_intermediate=False)
    best = np.argmax(tpr - fpr)
    assert sens - (1 - spec) == pytest.approx(tpr[best] - fpr[best])
    assert thr == thresholds[best]


def test_nan_scores_are_rejected() -> None:
    with pytest.raises(M.MetricInputError, match="NaN"):
        M.auroc([0, 1, 1], [0.1, np.nan, 0.3])
