"""evaluate_scores: fixed label set in every resample, rare-label flag, validation thresholds."""

from __future__ import annotations

import numpy as np
import pytest

from embedkit.eval import bootstrap as B
from embedkit.eval import evaluate_scores, youden
from embedkit.eval.summary import OPERATING_POINT


def _rare_task(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """n = 150, three common labels and one with exactly 2 positives (the issue's case)."""
    rng = np.random.default_rng(seed)
    n = 150
    y = (rng.random((n, 4)) < [0.3, 0.2, 0.1, 0.0]).astype(float)
    y[rng.choice(n, 2, replace=False), 3] = 1.0
    s = y * np.array([1.0, 0.8, 0.6, 0.5]) + rng.normal(size=y.shape)
    return y, np.ones_like(y, dtype=bool), s


def test_every_replicate_averages_the_labels_of_the_point_estimate() -> None:
    y, m, s = _rare_task()
    plain = B.bootstrap_indices(150, 1000, seed=0)
    lost = ((y[plain][:, :, 3].sum(axis=1)) == 0).sum()
    assert 80 < lost < 200  # ~13% of plain resamples miss the 2-positive label (the bug)
    fixed = B.bootstrap_indices(150, 1000, seed=0, targets=y, mask=m)
    pos, neg = y[fixed].sum(axis=1), (1 - y[fixed]).sum(axis=1)
    assert (pos > 0).all() and (neg > 0).all()  # every replicate: all four labels defined
    ci_fixed = B.bootstrap_ci(y, m, s, "macro_auroc", fixed)
    ci_plain = B.bootstrap_ci(y, m, s, "macro_auroc", plain)
    assert ci_fixed.n_valid == 1000
    assert ci_fixed.point == ci_plain.point
    assert (ci_fixed.low, ci_fixed.high) != pytest.approx((ci_plain.low, ci_plain.high), abs=1e-3)


def test_evaluate_scores_uses_the_fixed_label_set_and_flags_the_rare_label() -> None:
    y, m, s = _rare_task()
    result = evaluate_scores(y, m, list("abcd"), s, n_boot=300, seed=5)
    fixed = B.bootstrap_indices(150, 300, seed=5, targets=y, mask=m)
    ci = B.bootstrap_ci(y, m, s, "macro_auroc", fixed)
    assert result.metrics["macro_auroc"] == {"point": ci.point, "low": ci.low, "high": ci.high}
    rows = {r["label"]: r for r in result.per_label}
    assert rows["d"]["rare"] and rows["d"]["n_pos"] == 2
    assert not rows["a"]["rare"]
    assert any("rare in test" in n and "'d' (2/148)" in n for n in result.notes)
    assert result.operating_point is None  # no validation scores: no operating point
    assert rows["a"]["sensitivity"] is None and rows["a"]["threshold"] is None


def test_operating_point_is_chosen_on_validation_and_applied_on_test() -> None:
    y, m, s = _rare_task(seed=1)
    vy, vm, vs = _rare_task(seed=2)
    result = evaluate_scores(y, m, list("abcd"), s, n_boot=50, seed=0, val=(vy, vm, vs))
    assert result.operating_point == OPERATING_POINT == "youden on validation"
    for j, row in enumerate(result.per_label):
        thr, _, _ = youden(vy[:, j], vs[:, j], vm[:, j])
        assert row["threshold"] == thr
        called = s[:, j] >= thr
        assert row["sensitivity"] == pytest.approx(called[y[:, j] == 1].mean())
        assert row["specificity"] == pytest.approx((~called[y[:, j] == 0]).mean())
        # not the test-optimised point (which would be at least as good on test)
        _t, sens_t, spec_t = youden(y[:, j], s[:, j], m[:, j])
        assert row["sensitivity"] + row["specificity"] <= sens_t + spec_t + 1e-12


def test_a_label_without_scores_is_left_out_of_the_macro() -> None:
    y, m, s = _rare_task()
    s_nan = s.copy()
    s_nan[:, 1] = np.nan
    result = evaluate_scores(y, m, list("abcd"), s_nan, n_boot=100, seed=0)
    rows = {r["label"]: r for r in result.per_label}
    assert rows["b"]["auroc"] is None and rows["b"]["n_pos"] == int(y[:, 1].sum())
    keep = [0, 2, 3]
    alone = evaluate_scores(y[:, keep], m[:, keep], list("acd"), s[:, keep], n_boot=100, seed=0)
    assert result.metrics["macro_auroc"]["point"] == pytest.approx(
        alone.metrics["macro_auroc"]["point"]
    )
    assert result.metrics["macro_auroc"] == pytest.approx(alone.metrics["macro_auroc"])


def test_without_a_possible_fixed_label_set_the_record_still_gets_noted_intervals() -> None:
    rng = np.random.default_rng(0)
    y = np.zeros((40, 8))
    y[np.arange(8), np.arange(8)] = 1.0  # eight labels with one positive each among 40 rows
    s = y + rng.normal(size=y.shape)
    m = np.ones_like(y, dtype=bool)
    with pytest.raises(B.BootstrapError, match="could not draw"):
        B.bootstrap_indices(40, 200, seed=0, targets=y, mask=m)
    result = evaluate_scores(y, m, [f"l{j}" for j in range(8)], s, n_boot=200, seed=0)
    assert any("plain resamples instead" in n for n in result.notes)
    ci = B.bootstrap_ci(y, m, s, "macro_auroc", B.bootstrap_indices(40, 200, seed=0))
    assert result.metrics["macro_auroc"] == {"point": ci.point, "low": ci.low, "high": ci.high}
    assert all(r["rare"] for r in result.per_label)
