"""The metrics of one scored test split, as result records hold them."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from embedkit.eval.bootstrap import bootstrap_ci, bootstrap_indices
from embedkit.eval.metrics import per_label_ap, youden

__all__ = ["evaluate_scores"]


def _ci(y: np.ndarray, m: np.ndarray, s: np.ndarray, metric: str, idx: np.ndarray) -> dict:
    ci = bootstrap_ci(y, m, s, metric, indices=idx)
    return {"point": ci.point, "low": ci.low, "high": ci.high}


def evaluate_scores(
    targets: np.ndarray,
    mask: np.ndarray,
    labels: Sequence[str],
    scores: np.ndarray,
    n_boot: int,
    seed: int,
) -> tuple[dict[str, Any], list[dict[str, Any]], list[str]]:
    """Test metrics with bootstrap CIs, the per-label table, and notes on undefined labels.

    ``targets`` / ``mask`` are (N, L) for multi-label data (per-label AUROC, AP, Youden
    sensitivity / specificity, macro AUROC) or (N,) for multi-class data (one-vs-rest macro
    AUROC, accuracy, balanced accuracy). The bootstrap indices depend only on N and ``seed``, so
    runs scored on the same test images share them.
    """
    idx = bootstrap_indices(len(targets), n_boot=n_boot, seed=seed)
    notes: list[str] = []
    if targets.ndim == 1:  # multi-class
        multiclass: dict[str, Any] = {
            "ovr_macro_auroc": _ci(targets, mask, scores, "ovr_macro_auroc", idx),
            "accuracy": _ci(targets, mask, scores, "accuracy", idx),
            "balanced_accuracy": _ci(targets, mask, scores, "balanced_accuracy", idx),
        }
        return multiclass, [], notes
    aps = per_label_ap(targets, mask, scores)
    per_label = []
    for j, name in enumerate(labels):
        y, m, s = targets[:, j], mask[:, j], scores[:, j]
        n_pos = int((y[m] == 1).sum())
        n_neg = int(m.sum()) - n_pos
        row: dict[str, Any] = {"label": name, "n_pos": n_pos, "n_neg": n_neg}
        if n_pos == 0 or n_neg == 0:
            notes.append(
                f"'{name}' has {n_pos} positives and {n_neg} negatives in test: AUROC undefined, "
                "left out of the macro average"
            )
            row.update(auroc=None, low=None, high=None, ap=None, sensitivity=None, specificity=None)
        else:
            ci = _ci(y, m, s, "auroc", idx)
            _thr, sens, spec = youden(y, s, m)
            row.update(
                auroc=ci["point"], low=ci["low"], high=ci["high"], ap=float(aps[j]),
                sensitivity=sens, specificity=spec,
            )  # fmt: skip
        per_label.append(row)
    metrics: dict[str, Any] = {"macro_auroc": _ci(targets, mask, scores, "macro_auroc", idx)}
    metrics["macro_ap"] = float(np.nanmean(aps)) if np.isfinite(aps).any() else None
    return metrics, per_label, notes
