"""DeLong's test against a brute-force structural-components computation."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from embedkit.eval import delong as D


def _brute(y: np.ndarray, a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    def psi(x: np.ndarray, z: np.ndarray) -> np.ndarray:
        return (x[:, None] > z[None, :]) + 0.5 * (x[:, None] == z[None, :])

    v10, v01, aucs = [], [], []
    for s in (a, b):
        P = psi(s[y == 1], s[y == 0])
        aucs.append(P.mean())
        v10.append(P.mean(1))
        v01.append(P.mean(0))
    m, n = (y == 1).sum(), (y == 0).sum()
    return np.array(aucs), np.cov(np.array(v10)) / m + np.cov(np.array(v01)) / n


def test_auc_and_covariance_match_brute_force() -> None:
    rng = np.random.default_rng(0)
    y = (rng.random(60) < 0.4).astype(int)
    a = np.round(y + rng.normal(size=60), 1)
    b = np.round(0.5 * y + rng.normal(size=60), 1)
    aucs, cov = D.delong_covariance(y, np.stack([a, b]))
    ref_aucs, ref_cov = _brute(y, a, b)
    np.testing.assert_allclose(aucs, ref_aucs, atol=1e-12)
    np.testing.assert_allclose(cov, ref_cov, atol=1e-12)
    assert aucs[0] == pytest.approx(roc_auc_score(y, a))


def test_test_properties() -> None:
    rng = np.random.default_rng(1)
    y = (rng.random(400) < 0.5).astype(int)
    good = y * 2.0 + rng.normal(size=400)
    bad = y * 0.2 + rng.normal(size=400)
    assert D.delong_test(y, good, good).p_value == 1.0
    r1, r2 = D.delong_test(y, good, bad), D.delong_test(y, bad, good)
    assert r1.p_value < 0.01
    assert r1.p_value == pytest.approx(r2.p_value)
    assert r1.z == pytest.approx(-r2.z)
    auc, low, high = D.delong_ci(y, good)
    assert low < auc < high


def test_masked_entries_excluded_per_label() -> None:
    rng = np.random.default_rng(2)
    y = (rng.random((200, 2)) < 0.4).astype(float)
    a = y + rng.normal(size=y.shape)
    b = 0.5 * y + rng.normal(size=y.shape)
    mask = rng.random(y.shape) > 0.3
    res = D.delong_test_per_label(y, mask, a, b)
    for j in range(2):
        m = mask[:, j]
        ref = D.delong_test(y[m, j], a[m, j], b[m, j])
        assert res[j] == pytest.approx(ref)
