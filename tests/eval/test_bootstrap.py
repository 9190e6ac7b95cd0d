"""Bootstrap CIs, paired tests and p-value adjustment."""

from __future__ import annotations

import numpy as np
import pytest

from embedkit.eval import bootstrap as B
from embedkit.eval import metrics as M


def _task(n: int, seed: int = 0, signal: float = 1.0) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(seed)
    y = (rng.random((n, 4)) < 0.3).astype(float)
    mask = rng.random((n, 4)) > 0.1
    s = y * signal + rng.normal(size=(n, 4))
    return y, mask, s


def test_indices_are_deterministic_and_stratified() -> None:
    a = B.bootstrap_indices(50, 20, seed=3)
    np.testing.assert_array_equal(a, B.bootstrap_indices(50, 20, seed=3))
    assert not np.array_equal(a, B.bootstrap_indices(50, 20, seed=4))
    strata = np.r_[np.zeros(10), np.ones(40)]
    s = B.bootstrap_indices(50, 30, seed=0, strata=strata)
    assert (strata[s] == strata).all()  # each stratum keeps its size


def test_ci_contains_point_and_shrinks_with_n() -> None:
    widths = []
    for n in (200, 3200):
        y, m, s = _task(n)
        ci = B.bootstrap_ci(y, m, s, indices=B.bootstrap_indices(n, 200))
        assert ci.low <= ci.point <= ci.high
        widths.append(ci.high - ci.low)
    assert widths[1] < widths[0] / 2


def test_vectorised_replicates_equal_loop() -> None:
    y, m, s = _task(150, seed=1)
    idx = B.bootstrap_indices(150, 40)
    fast = B.bootstrap_ci(y, m, s, "macro_auroc", idx)
    slow = B.bootstrap_ci(y, m, s, lambda yy, mm, ss: M.macro_auroc(yy, mm, ss), idx)
    assert fast == pytest.approx(slow, abs=1e-12)


def test_thousand_replicates_of_10k_by_14_bracket_the_point_and_repeat() -> None:
    # The speed of this size is measured in benchmarks/bench_probes.py (bootstrap), not here.
    rng = np.random.default_rng(0)
    y = (rng.random((10_000, 14)) < 0.1).astype(float)
    s = y + rng.normal(size=y.shape)
    idx = B.bootstrap_indices(10_000, 1000)
    ci = B.bootstrap_ci(y, None, s, indices=idx)
    assert ci.low < ci.point < ci.high
    assert ci.high - ci.low < 0.02  # 10k rows: a narrow interval around a ~0.76 macro AUROC
    assert B.bootstrap_ci(y, None, s, indices=B.bootstrap_indices(10_000, 1000)) == ci


def test_paired_test_identical_and_different() -> None:
    y, m, s = _task(300, seed=2)
    idx = B.bootstrap_indices(300, 300)
    same = B.paired_bootstrap_test(y, m, s, s, idx)
    assert same.delta == 0.0
    assert same.p_value == 1.0
    noise = np.random.default_rng(9).normal(size=s.shape)
    diff = B.paired_bootstrap_test(y, m, s, y * 0.1 + noise, idx)
    assert diff.delta > 0
    assert diff.p_value < 0.01
    assert diff.ci[0] > 0
    # (1 + #{Δ* <= 0}) / (B + 1) with no replicate <= 0 gives the smallest p: 2 / (B + 1)
    assert diff.p_value == pytest.approx(2 / 301)
    swapped = B.paired_bootstrap_test(y, m, y * 0.1 + noise, s, idx)
    assert swapped.p_value == diff.p_value
    assert swapped.delta == -diff.delta


def test_adjust_pvalues_hand_computed() -> None:
    p = [0.01, 0.04, 0.03, 0.005]
    # Holm: sorted 0.005, 0.01, 0.03, 0.04 times 4, 3, 2, 1 -> 0.02, 0.03, 0.06, 0.04 -> cummax
    np.testing.assert_allclose(B.adjust_pvalues(p, "holm"), [0.03, 0.06, 0.06, 0.02])
    # BH: 0.005*4/1=0.02, 0.01*4/2=0.02, 0.03*4/3=0.04, 0.04*4/4=0.04 -> cummin from the top
    np.testing.assert_allclose(B.adjust_pvalues(p, "fdr_bh"), [0.02, 0.04, 0.04, 0.02])
    np.testing.assert_allclose(B.adjust_pvalues(p, "bonferroni"), [0.04, 0.16, 0.12, 0.02])
    out = B.adjust_pvalues([0.5, np.nan, 0.6], "holm")
    assert np.isnan(out[1])
    np.testing.assert_allclose(out[[0, 2]], [1.0, 1.0])  # 0.5*2=1.0, then max(1.0, 0.6*1)
    with pytest.raises(B.BootstrapError, match="did you mean 'holm'"):
        B.adjust_pvalues(p, "hom")  # type: ignore[arg-type]


def test_bad_indices_are_rejected() -> None:
    y, m, s = _task(20)
    with pytest.raises(B.BootstrapError, match="bootstrap_indices"):
        B.bootstrap_ci(y, m, s, indices=B.bootstrap_indices(30, 5))


def test_vectorised_replicates_equal_loop_with_ties_and_float_weights() -> None:
    y, m, s = _task(400, seed=5)
    s = np.round(s, 1)  # many tied scores, within and across classes
    idx = B.bootstrap_indices(400, 60, seed=2)
    fast = B.bootstrap_ci(y, m, s, "macro_auroc", idx)
    slow = B.bootstrap_ci(y, m, s, lambda yy, mm, ss: M.macro_auroc(yy, mm, ss), idx)
    assert fast == pytest.approx(slow, abs=1e-12)
    from sklearn.metrics import roc_auc_score

    j = 0
    rows = m[:, j]
    assert M.per_label_auroc(y, m, s)[j] == pytest.approx(roc_auc_score(y[rows, j], s[rows, j]))
    # Non-integer weights: replicate b with weights w equals the explicit weighted pair count.
    w = np.random.default_rng(0).random((3, 400))
    got = M.auroc_columns(y[:, :1], m[:, :1], s[:, :1], w)[:, 0]
    pos, neg = rows & (y[:, 0] == 1), rows & (y[:, 0] == 0)
    for b in range(3):
        wp, wn = w[b, pos], w[b, neg]
        sp, sn = s[pos, 0], s[neg, 0]
        gt = (sp[:, None] > sn[None, :]) + 0.5 * (sp[:, None] == sn[None, :])
        expected = (wp[:, None] * wn[None, :] * gt).sum() / (wp.sum() * wn.sum())
        assert got[b] == pytest.approx(expected, abs=1e-12)
