"""The metrics of one scored test split, as result records hold them (``docs/statistics.md``).

Rules:

- **Fixed label set**: the bootstrap resamples keep both classes of every label that has both on
  the full test split (:func:`~embedkit.eval.bootstrap.bootstrap_indices` with ``targets=``), so
  every replicate of the macro AUROC averages the same labels as the point estimate (when no
  such resamples exist, e.g. many one-positive labels in a tiny test set: plain resamples and a
  note).
- **Rare labels**: a label with fewer than :data:`RARE_LABEL_MIN` positives or negatives among
  its valid test entries is flagged (``rare: true`` in its per-label row and a note): its CI
  under-covers (simulation in ``docs/statistics.md``).
- **Operating points from validation**: sensitivity and specificity are measured on test at the
  Youden threshold chosen on the *validation* scores (:data:`OPERATING_POINT`); without
  validation scores for a label there is no operating point (``None``).
- **Labels without scores** (all-NaN score column: a label the probe left out because it had one
  class in train) are reported and left out of the macro average, like a test label that lacks a
  class.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np

from embedkit.eval.bootstrap import bootstrap_ci, label_set_indices
from embedkit.eval.metrics import per_label_ap, youden

__all__ = ["OPERATING_POINT", "RARE_LABEL_MIN", "Evaluation", "evaluate_scores"]

#: A label with fewer positives (or negatives) than this among its valid test entries is flagged
#: rare. Simulated coverage of a label's 95% bootstrap CI at n = 150 (``benchmarks/
#: sim_statistics.py``, docs/statistics.md): 0.59 / 0.77 / 0.87 / 0.92 with 2 / 3 / 5 / 10
#: positives, 0.94 from 20 on.
RARE_LABEL_MIN = 20

#: How sensitivity and specificity are measured: the threshold maximising Youden's J on the
#: validation split's scores, applied to the test scores.
OPERATING_POINT = "youden on validation"


class Evaluation(NamedTuple):
    """What :func:`evaluate_scores` returns: the record's metrics, per-label rows, notes, and
    the rule of its operating points (None when no validation scores were given)."""

    metrics: dict[str, Any]
    per_label: list[dict[str, Any]]
    notes: list[str]
    operating_point: str | None


def _ci(
    y: np.ndarray, m: np.ndarray, s: np.ndarray, metric: str, idx: np.ndarray
) -> dict[str, Any]:
    ci = bootstrap_ci(y, m, s, metric, indices=idx)
    return {"point": ci.point, "low": ci.low, "high": ci.high}


def _rates(y: np.ndarray, m: np.ndarray, s: np.ndarray, threshold: float) -> tuple[float, float]:
    """(sensitivity, specificity) of ``score >= threshold`` over the valid entries."""
    yv, called = y[m] == 1, s[m] >= threshold
    return float(called[yv].mean()), float((~called[~yv]).mean())


def evaluate_scores(
    targets: np.ndarray,
    mask: np.ndarray,
    labels: Sequence[str],
    scores: np.ndarray,
    n_boot: int,
    seed: int,
    *,
    val: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
) -> Evaluation:
    """Test metrics with bootstrap CIs, the per-label table, and notes on undefined labels.

    ``targets`` / ``mask`` are (N, L) for multi-label data (per-label AUROC, AP, sensitivity /
    specificity at the validation Youden threshold, macro AUROC) or (N,) for multi-class data
    (one-vs-rest macro AUROC, accuracy, balanced accuracy). ``val`` is the validation split's
    ``(targets, mask, scores)`` of the same model, from which the thresholds are chosen. The
    bootstrap indices depend only on the test targets, mask and ``seed``, so runs scored on the
    same test images share them.
    """
    notes: list[str] = []
    scores = np.asarray(scores, dtype=np.float64)
    if targets.ndim == 1:  # multi-class
        idx, fallback = label_set_indices(len(targets), n_boot, seed, targets, mask)
        notes.extend([fallback] if fallback else [])
        multiclass: dict[str, Any] = {
            "ovr_macro_auroc": _ci(targets, mask, scores, "ovr_macro_auroc", idx),
            "accuracy": _ci(targets, mask, scores, "accuracy", idx),
            "balanced_accuracy": _ci(targets, mask, scores, "balanced_accuracy", idx),
        }
        return Evaluation(multiclass, [], notes, None)
    unscored = np.isnan(scores).all(axis=0)
    eval_mask = mask & ~unscored[None, :]
    idx, fallback = label_set_indices(len(targets), n_boot, seed, targets, eval_mask)
    notes.extend([fallback] if fallback else [])
    safe = np.where(np.isnan(scores), 0.0, scores)
    aps = per_label_ap(targets, eval_mask, safe)
    per_label = []
    rare: list[str] = []
    any_threshold = False
    for j, name in enumerate(labels):
        y, m, s = targets[:, j], mask[:, j], safe[:, j]
        n_pos = int((y[m] == 1).sum())
        n_neg = int(m.sum()) - n_pos
        row: dict[str, Any] = {"label": name, "n_pos": n_pos, "n_neg": n_neg}
        empty = dict.fromkeys(
            ("auroc", "low", "high", "ap", "sensitivity", "specificity", "threshold")
        )
        if unscored[j]:
            row.update(empty)
        elif n_pos == 0 or n_neg == 0:
            notes.append(
                f"'{name}' has {n_pos} positives and {n_neg} negatives in test: AUROC undefined, "
                "left out of the macro average"
            )
            row.update(empty)
        else:
            ci = _ci(y, m, s, "auroc", idx)
            thr = sens = spec = None
            if val is not None:
                vy, vm, vs = val[0][:, j], val[1][:, j], val[2][:, j]
                t, _, _ = youden(vy, np.where(np.isnan(vs), 0.0, vs), vm)
                if np.isfinite(t):
                    thr = float(t)
                    sens, spec = _rates(y, m, s, thr)
                    any_threshold = True
            row.update(
                auroc=ci["point"], low=ci["low"], high=ci["high"], ap=float(aps[j]),
                sensitivity=sens, specificity=spec, threshold=thr,
            )  # fmt: skip
            if min(n_pos, n_neg) < RARE_LABEL_MIN:
                rare.append(f"'{name}' ({n_pos}/{n_neg})")
        row["rare"] = row["auroc"] is not None and min(n_pos, n_neg) < RARE_LABEL_MIN
        per_label.append(row)
    if rare:
        notes.append(
            f"rare in test (fewer than {RARE_LABEL_MIN} positives or negatives; CIs under-cover, "
            f"see docs/statistics.md): {', '.join(rare)}"
        )
    metrics: dict[str, Any] = {"macro_auroc": _ci(targets, eval_mask, safe, "macro_auroc", idx)}
    metrics["macro_ap"] = float(np.nanmean(aps)) if np.isfinite(aps).any() else None
    return Evaluation(metrics, per_label, notes, OPERATING_POINT if any_threshold else None)
