"""Few-shot draws: exact counts, unique patients, determinism, no leakage; run_fewshot."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.datasets import load_digits

from embedkit.probes import (
    FewShotSamplingError,
    PatientLeakageError,
    run_fewshot,
    sample_fewshot,
)


def _multilabel(n: int = 600, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = (rng.random((n, 4)) < 0.3).astype(np.float32)
    mask = rng.random((n, 4)) > 0.2
    groups = rng.integers(0, n // 3, n)  # ~3 images per patient
    return y, mask, groups


@pytest.mark.parametrize("n_shots", [1, 4, 8])
def test_multilabel_counts_patients_and_masks(n_shots: int) -> None:
    y, mask, groups = _multilabel()
    draw = sample_fewshot(y, mask, groups, n_shots, seed=0)
    sub_y, sub_m = y[draw.indices], draw.mask
    assert (sub_m.sum(1) == 1).all()  # each image trains exactly one label
    for j in range(4):
        assert int((sub_y[:, j][sub_m[:, j]] == 1).sum()) == n_shots
        assert int((sub_y[:, j][sub_m[:, j]] == 0).sum()) == n_shots
    assert mask[draw.indices][sub_m].all()  # only valid entries are used
    assert np.unique(groups[draw.indices]).size == draw.indices.size == 8 * n_shots


def test_multiclass_counts_and_determinism() -> None:
    _, y = load_digits(return_X_y=True)
    groups = np.arange(y.size) // 2
    a = sample_fewshot(y, None, groups, 4, seed=1)
    assert np.bincount(y[a.indices]).tolist() == [4] * 10
    assert np.unique(groups[a.indices]).size == 40
    np.testing.assert_array_equal(a.indices, sample_fewshot(y, None, groups, 4, seed=1).indices)
    assert not np.array_equal(a.indices, sample_fewshot(y, None, groups, 4, seed=2).indices)


def test_candidates_and_leakage_guard() -> None:
    y, mask, groups = _multilabel()
    candidates = np.arange(0, 600, 2)
    for seed in range(5):
        draw = sample_fewshot(y, mask, groups, 2, seed, candidates=candidates)
        assert np.isin(draw.indices, candidates).all()
    test_patients = groups[:5]
    with pytest.raises(PatientLeakageError, match="training patients"):
        sample_fewshot(y, mask, groups, 2, 0, exclude_groups=test_patients)
    train = ~np.isin(groups, test_patients)
    draw = sample_fewshot(y[train], mask[train], groups[train], 2, 0, exclude_groups=test_patients)
    assert not np.isin(groups[train][draw.indices], test_patients).any()


def test_too_few_patients_raises() -> None:
    y = np.array([0, 0, 1, 1])
    with pytest.raises(FewShotSamplingError, match="1 eligible patients, 2 needed"):
        sample_fewshot(y, None, np.array([0, 0, 1, 1]), 2, seed=0)


@pytest.mark.parametrize("classifier", ["linear", "prototype", "knn"])
def test_run_fewshot_on_digits(classifier: str) -> None:
    X, y = load_digits(return_X_y=True)
    X = X.astype(np.float32)
    groups = np.arange(y.size)
    res = run_fewshot(
        X[:1200], y[:1200], None, groups[:1200], X[1200:], y[1200:], None,
        shots=(1, 8), seeds=range(3), classifier=classifier,  # type: ignore[arg-type]
    )  # fmt: skip
    assert set(res.runs) == {(s, k) for s in (1, 8) for k in range(3)}
    s8 = res.summary[8]["accuracy"]
    assert s8["ci_low"] <= s8["mean"] <= s8["ci_high"]
    assert s8["mean"] > 0.75
    assert s8["mean"] > res.summary[1]["accuracy"]["mean"]


def test_run_fewshot_multilabel_linear() -> None:
    X, d = load_digits(return_X_y=True)
    Y = np.stack([np.isin(d, [0, 1, 2]), d % 2 == 0], axis=1).astype(np.float32)
    res = run_fewshot(
        X[:1200], Y[:1200], None, np.arange(1200), X[1200:], Y[1200:], None,
        shots=(4,), seeds=range(2),
    )  # fmt: skip
    assert res.summary[4]["macro_auroc"]["mean"] > 0.6
