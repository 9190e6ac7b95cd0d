"""paired_permutation_test against a brute-force loop with the same swaps."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import rankdata
from sklearn.metrics import roc_auc_score

from embedkit.eval.permutation import _BLOCK_ELEMENTS, paired_permutation_test


def _macro(y: np.ndarray, valid: np.ndarray, s: np.ndarray) -> float:
    values = []
    for j in range(y.shape[1]):
        yv = y[valid[:, j], j]
        if 0 < yv.sum() < yv.size:
            values.append(roc_auc_score(yv, s[valid[:, j], j]))
    return float(np.mean(values))


def _ranks(s: np.ndarray, valid: np.ndarray) -> np.ndarray:
    out = np.full(s.shape, np.nan)
    for j in range(s.shape[1]):
        out[valid[:, j], j] = rankdata(s[valid[:, j], j])
    return out


def _brute(y, valid, sa, sb, n_perm, seed):  # type: ignore[no-untyped-def]
    """The same swaps as the implementation (one uniform per image and permutation, drawn in
    blocks) of each model's per-label ranks among the valid entries, each permuted pair scored
    with scikit-learn."""
    n = y.shape[0]
    sa, sb = _ranks(sa, valid), _ranks(sb, valid)
    rng = np.random.default_rng(seed)
    block = max(1, _BLOCK_ELEMENTS // (2 * n))
    swaps = np.concatenate(
        [rng.random((min(block, n_perm - lo), n)) < 0.5 for lo in range(0, n_perm, block)]
    )
    observed = _macro(y, valid, sa) - _macro(y, valid, sb)
    extreme = 0
    for swap in swaps:
        a = np.where(swap[:, None], sb, sa)
        b = np.where(swap[:, None], sa, sb)
        extreme += abs(_macro(y, valid, a) - _macro(y, valid, b)) >= abs(observed) - 1e-12
    return observed, (1 + extreme) / (n_perm + 1)


def _task(n: int, seed: int, gain: float = 0.0):  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(seed)
    y = (rng.random((n, 3)) < [0.4, 0.2, 0.1]).astype(float)
    valid = rng.random((n, 3)) > 0.15
    sa = y * (0.8 + gain) + rng.normal(size=y.shape)
    sb = np.round(y * 0.8 + rng.normal(size=y.shape), 1)  # ties
    return y, valid, sa, sb


def test_equals_brute_force_with_masks_and_ties() -> None:
    y, valid, sa, sb = _task(60, seed=0, gain=0.3)
    test = paired_permutation_test(y, valid, sa, sb, n_perm=200, seed=4)
    observed, p = _brute(y, valid, sa, sb, 200, 4)
    assert test.delta == pytest.approx(observed, abs=1e-12)
    assert test.p_value == pytest.approx(p, abs=1e-12)
    assert test.n_labels == 3 and test.n_perm == 200


def test_identical_models_give_p_one_and_a_better_model_a_small_p() -> None:
    y, valid, sa, _sb = _task(200, seed=1)
    same = paired_permutation_test(y, valid, sa, sa.copy(), n_perm=300)
    assert same.delta == 0.0 and same.p_value == 1.0
    rng = np.random.default_rng(2)
    worse = y * 0.1 + rng.normal(size=y.shape)
    better = paired_permutation_test(y, valid, y * 2.0 + rng.normal(size=y.shape), worse, 500)
    assert better.delta > 0.2 and better.p_value < 0.01


def test_scale_free_ranks() -> None:
    y, valid, sa, sb = _task(80, seed=3, gain=0.2)
    ref = paired_permutation_test(y, valid, sa, sb, n_perm=100)
    scaled = paired_permutation_test(y, valid, np.exp(sa), sb * 1000 - 5, n_perm=100)
    assert scaled == ref


def test_multiclass_is_one_vs_rest() -> None:
    rng = np.random.default_rng(5)
    n, k = 90, 3
    y = rng.integers(0, k, n)
    onehot = np.eye(k)[y]
    sa = onehot * 1.5 + rng.normal(size=(n, k))
    sb = onehot * 0.5 + rng.normal(size=(n, k))
    test = paired_permutation_test(y, None, sa, sb, n_perm=150, seed=1)
    observed, p = _brute(onehot, np.ones((n, k), bool), sa, sb, 150, 1)
    assert test.delta == pytest.approx(observed, abs=1e-12)
    assert test.p_value == pytest.approx(p, abs=1e-12)


def test_a_label_with_one_class_is_left_out() -> None:
    y, valid, sa, sb = _task(50, seed=6, gain=0.5)
    y[:, 2] = 0.0
    test = paired_permutation_test(y, valid, sa, sb, n_perm=50)
    assert test.n_labels == 2
    assert test.delta == pytest.approx(_macro(y, valid, sa) - _macro(y, valid, sb))
