"""Few-shot probing: patient-wise draws of n labelled examples, several seeds, mean and spread.

Protocol (the DINOv2 radiology study's few-shot evaluation): n labelled examples per class
(1, 2, 4, 8, 16, ...), several independent draws (seeds), mean and spread reported; medical
multi-label data is sampled by patient and validation / test patients never enter a training
draw.

Definition of a draw (:func:`sample_fewshot`):

- multi-class: for each class, ``n`` patients with a valid image of that class, one image each;
- multi-label: for each label, ``n`` positive AND ``n`` negative images (valid entries only), from
  ``n`` + ``n`` distinct patients, one image each. Label l is then trained only on its own 2n
  images (``FewShotDraw.mask``): every label sees exactly n positives and n negatives, whatever
  the other labels' draws contain.

A patient contributes at most one image to a draw (across all classes / labels). Classes /
labels are visited in order, patients are drawn uniformly among those still unused, and the image
uniformly among that patient's eligible images, all from ``numpy.random.default_rng(seed)``.
The caller passes the training candidates only; ``exclude_groups`` (validation / test patient
ids) turns any overlap into an error instead of trusting the split.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from numpy.typing import ArrayLike, NDArray
from scipy import stats

from embedkit.errors import FewShotSamplingError, PatientLeakageError
from embedkit.eval import metrics as M
from embedkit.probes.backends import (
    ProbeInputError,
    Source,
    check_features,
    column_stats,
    safe_scale,
    torch_dtype,
)
from embedkit.probes.dense import (
    DENSE_MAX_VALUES,
    DenseLogistic,
    blas_threads,
    dense_newton,
    with_ones,
)
from embedkit.probes.knn import KNNProbe
from embedkit.probes.linear import EXACT_BLOCKS_MAX_FEATURES, LogisticProbe
from embedkit.probes.policies import DEFAULT_TOL
from embedkit.progress import ProgressFactory, no_progress

__all__ = [
    "FewShotDraw",
    "FewShotResult",
    "FewShotSamplingError",
    "PatientLeakageError",
    "run_fewshot",
    "sample_fewshot",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class FewShotDraw:
    """One draw: sorted row ``indices`` into the training arrays and the training ``mask`` of
    those rows (multi-label: True only for the label each image was drawn for, and valid)."""

    indices: NDArray[np.int64]
    mask: NDArray[np.bool_]


def _task(y: NDArray[Any], task: str) -> Literal["multilabel", "multiclass"]:
    if task == "auto":
        return "multilabel" if y.ndim == 2 else "multiclass"
    if task not in ("multilabel", "multiclass"):
        raise ProbeInputError(
            f"Invalid task '{task}', choose one of ['auto', 'multilabel', 'multiclass']."
        )
    return task  # type: ignore[return-value]


def _check_groups(groups: NDArray[Any], exclude_groups: Iterable[Any] | None) -> None:
    if exclude_groups is None:
        return
    forbidden = np.asarray(list(exclude_groups))
    overlap = np.intersect1d(np.unique(groups), forbidden)
    if overlap.size:
        raise PatientLeakageError(
            f"{overlap.size} training patients are also in the excluded (validation/test) set, "
            f"e.g. {overlap[:5].tolist()}; pass only training rows (patient-wise split)."
        )


def sample_fewshot(
    y: ArrayLike,
    mask: ArrayLike | None,
    groups: ArrayLike,
    n_shots: int,
    seed: int,
    task: Literal["auto", "multilabel", "multiclass"] = "auto",
    candidates: ArrayLike | None = None,
    exclude_groups: Iterable[Any] | None = None,
) -> FewShotDraw:
    """Draw ``n_shots`` per class (multi-class) or n positives + n negatives per label
    (multi-label), one image per patient, from the rows in ``candidates`` (default: all rows).

    Raises :class:`FewShotSamplingError` when a class / label has too few unused patients, and
    :class:`PatientLeakageError` when a candidate's patient is in ``exclude_groups``.
    """
    y_arr = np.asarray(y)
    g = np.asarray(groups)
    n = y_arr.shape[0]
    if g.shape != (n,):
        raise ProbeInputError(f"Expected groups of shape ({n},), got {g.shape} instead.")
    if n_shots < 1:
        raise ProbeInputError(f"Expected n_shots >= 1, got {n_shots}.")
    kind = _task(y_arr, task)
    m = np.ones(y_arr.shape, bool) if mask is None else np.asarray(mask, bool)
    if m.shape != y_arr.shape:
        raise ProbeInputError(f"Expected a mask of shape {y_arr.shape}, got {m.shape}.")
    allowed = np.zeros(n, bool)
    if candidates is None:
        allowed[:] = True
    else:
        allowed[np.asarray(candidates, dtype=np.int64)] = True
    _check_groups(g[allowed], exclude_groups)
    rng = np.random.default_rng(seed)
    used = np.zeros(n, bool)  # rows whose patient is already in the draw
    _, patient = np.unique(g, return_inverse=True)
    chosen: list[tuple[int, int]] = []  # (row, label or -1)

    def draw(eligible: NDArray[np.bool_], what: str, label: int) -> None:
        rows = np.flatnonzero(eligible & allowed & ~used)
        pats = np.unique(patient[rows])
        if pats.size < n_shots:
            raise FewShotSamplingError(
                f"{what}: {pats.size} eligible patients, {n_shots} needed; use fewer shots."
            )
        for p in rng.permutation(pats)[:n_shots]:
            options = rows[patient[rows] == p]
            row = int(options[rng.integers(options.size)])
            chosen.append((row, label))
            used[patient == p] = True

    if kind == "multiclass":
        for c in np.unique(y_arr[m & allowed]):
            draw(m & (y_arr == c), f"class {c!r}", -1)
    else:
        for j in range(y_arr.shape[1]):
            draw(m[:, j] & (y_arr[:, j] == 1), f"label {j} positives", j)
            draw(m[:, j] & (y_arr[:, j] == 0), f"label {j} negatives", j)
    rows_sorted = sorted(chosen)
    indices = np.array([r for r, _ in rows_sorted], dtype=np.int64)
    if kind == "multiclass":
        return FewShotDraw(indices, m[indices].copy())
    draw_mask = np.zeros((indices.size, y_arr.shape[1]), bool)
    for pos, (_, label) in enumerate(rows_sorted):
        draw_mask[pos, label] = True
    return FewShotDraw(indices, draw_mask & m[indices])


@dataclass(frozen=True)
class FewShotResult:
    """``runs[(shots, seed)]``: metric dict of one draw; ``summary[shots][metric]``: mean, std
    (ddof 1), and the 95% t-interval of the mean across seeds (NaN with fewer than 2 seeds)."""

    runs: dict[tuple[int, int], dict[str, float]]
    summary: dict[int, dict[str, dict[str, float]]] = field(default_factory=dict)


def _summarise(values: Sequence[float], level: float = 0.95) -> dict[str, float]:
    v = np.asarray(values, dtype=np.float64)
    v = v[~np.isnan(v)]
    if v.size == 0:
        return {"mean": float("nan"), "std": float("nan"), "ci_low": float("nan"),
                "ci_high": float("nan"), "n": 0}  # fmt: skip
    mean = float(v.mean())
    if v.size < 2:
        return {"mean": mean, "std": float("nan"), "ci_low": float("nan"),
                "ci_high": float("nan"), "n": int(v.size)}  # fmt: skip
    std = float(v.std(ddof=1))
    half = float(stats.t.ppf(0.5 + level / 2, v.size - 1)) * std / np.sqrt(v.size)
    return {"mean": mean, "std": std, "ci_low": mean - half, "ci_high": mean + half,
            "n": int(v.size)}  # fmt: skip


def _prototype_scores(
    Xtr: NDArray[Any], y: NDArray[Any], m: NDArray[np.bool_], Xte: NDArray[Any], kind: str,
    classes: NDArray[Any] | None,
) -> NDArray[np.float64]:  # fmt: skip
    """Cosine similarity to class prototypes (mean of L2-normalised features)."""

    def norm(a: NDArray[Any]) -> NDArray[np.float64]:
        a64 = np.asarray(a, dtype=np.float64)
        unit: NDArray[np.float64] = a64 / np.maximum(
            np.linalg.norm(a64, axis=1, keepdims=True), 1e-12
        )
        return unit

    tr = norm(Xtr)
    te = norm(Xte)
    if kind == "multiclass":
        assert classes is not None
        protos = np.stack([tr[m & (y == c)].mean(0) for c in classes])
        sims = te @ norm(protos).T
        z = (sims - sims.max(1, keepdims=True)) / 0.07  # DINO temperature, as the kNN vote
        e = np.exp(z)
        return np.asarray(e / e.sum(1, keepdims=True))
    out = np.empty((te.shape[0], y.shape[1]))
    for j in range(y.shape[1]):
        pos = norm(tr[m[:, j] & (y[:, j] == 1)].mean(0, keepdims=True))
        neg = norm(tr[m[:, j] & (y[:, j] == 0)].mean(0, keepdims=True))
        out[:, j] = (te @ pos.T - te @ neg.T)[:, 0]
    return out


def _linear_draws(
    X: NDArray[Any],
    y: NDArray[Any],
    draws: Sequence[FewShotDraw],
    X_test: NDArray[Any],
    kind: str,
    classes: NDArray[Any] | None,
    C: float,
) -> list[NDArray[np.float64]] | None:
    """Test scores of ``LogisticProbe(C=C)`` fitted on each draw, with every draw solved at once
    as one batched problem (:class:`~embedkit.probes.dense.DenseLogistic`: one problem per draw
    and label, or per draw for softmax, each on its own rows standardised by its own statistics,
    exactly the objective of a separate fit). None when the draws are too large for the dense
    path or a draw lacks a class; the caller then fits them one by one."""
    d = X.shape[1]
    n_rows = sum(dr.indices.size for dr in draws)
    if d > EXACT_BLOCKS_MAX_FEATURES or n_rows * (d + 1) > DENSE_MAX_VALUES:
        return None
    parts, stats = [], []
    for dr in draws:
        X_d = np.asarray(X[dr.indices], dtype=np.float64)
        mean, std = column_stats([Source(X_d)])
        scale = safe_scale(std)
        parts.append((X_d - mean) / scale)
        stats.append((mean, scale))
    rows = np.arange(n_rows)
    owner = np.repeat(np.arange(len(draws)), [dr.indices.size for dr in draws])
    y_rows = np.concatenate([y[dr.indices] for dr in draws])
    m_rows = np.concatenate([dr.mask for dr in draws])
    if kind == "multiclass":
        assert classes is not None
        k = classes.size
        if any(np.unique(y[dr.indices][dr.mask]).size != k for dr in draws):
            return None
        m = np.zeros((n_rows, len(draws)))
        m[rows, owner] = m_rows
        Y = np.zeros((n_rows, len(draws) * k))
        Y[rows, owner * k + np.minimum(np.searchsorted(classes, y_rows), k - 1)] = 1.0
        prob = DenseLogistic(with_ones(np.vstack(parts)), Y, m, k)
    else:
        k = y.shape[1]
        m = np.zeros((n_rows, len(draws) * k))
        Y = np.zeros_like(m)
        for i in range(len(draws)):
            sel = owner == i
            m[sel, i * k : (i + 1) * k] = m_rows[sel]
            Y[sel, i * k : (i + 1) * k] = np.where(m_rows[sel], y_rows[sel], 0)
        prob = DenseLogistic(with_ones(np.vstack(parts)), Y, m)
    with blas_threads(1):
        W, info = dense_newton(
            prob, np.zeros((d + 1, Y.shape[1])), np.full(prob.n_problems, C),
            max_iter=1000, tol=DEFAULT_TOL,
        )  # fmt: skip
    if not info.converged.all():
        logger.warning("few-shot: %d draws did not converge", int((~info.converged).sum()))
    Xt = np.asarray(X_test, dtype=np.float64)
    out = []
    for i, (mean, scale) in enumerate(stats):
        w = W[:-1, i * k : (i + 1) * k] / scale[:, None]
        z = Xt @ w + (W[-1, i * k : (i + 1) * k] - mean @ w)
        if kind == "multiclass":
            e = np.exp(z - z.max(1, keepdims=True))
            out.append(e / e.sum(1, keepdims=True))
        else:
            out.append(1.0 / (1.0 + np.exp(-z)))
    return out


def run_fewshot(
    X_train: ArrayLike,
    y_train: ArrayLike,
    mask_train: ArrayLike | None,
    groups_train: ArrayLike,
    X_test: ArrayLike,
    y_test: ArrayLike,
    mask_test: ArrayLike | None,
    shots: Sequence[int] = (1, 2, 4, 8, 16),
    seeds: Iterable[int] = range(5),
    classifier: Literal["linear", "prototype", "knn"] = "linear",
    task: Literal["auto", "multilabel", "multiclass"] = "auto",
    exclude_groups: Iterable[Any] | None = None,
    linear_C: float = 1.0,
    knn_k: int = 20,
    dtype: torch.dtype | str = torch.float64,
    progress: ProgressFactory | None = None,
) -> FewShotResult:
    """Few-shot evaluation over ``shots`` x ``seeds`` draws; see the module docstring.

    Classifiers: ``linear`` = :class:`LogisticProbe` at the fixed ``linear_C`` (standardised; a
    few-shot draw leaves no data to choose C, so it is a pre-registered constant, not tuned);
    ``prototype`` = cosine similarity to class means of L2-normalised features (multi-label:
    similarity to the positive minus the negative prototype); ``knn`` = :class:`KNNProbe` with
    k = min(``knn_k``, draw size). Metrics: macro AUROC and macro AP (multi-label); accuracy,
    balanced accuracy and one-vs-rest macro AUROC (multi-class).

    ``linear`` in float64 on small draws (the usual case) solves all seeds of one shot count
    together (:func:`_linear_draws`); the result is that of separate fits. ``progress``: a
    factory ``(total, description) -> context yielding advance(n)`` (one unit per draw).
    """
    Xtr = check_features(X_train, "X_train")
    Xte = check_features(X_test, "X_test")
    y_tr = np.asarray(y_train)
    kind = _task(y_tr, task)
    m_tr = np.ones(y_tr.shape, bool) if mask_train is None else np.asarray(mask_train, bool)
    y_te = np.asarray(y_test)
    m_te = np.ones(y_te.shape, bool) if mask_test is None else np.asarray(mask_test, bool)
    if classifier not in ("linear", "prototype", "knn"):
        raise ProbeInputError(
            f"Invalid classifier '{classifier}', choose one of ['linear', 'prototype', 'knn']."
        )
    classes = np.unique(y_tr[m_tr]) if kind == "multiclass" else None
    runs: dict[tuple[int, int], dict[str, float]] = {}
    seed_list = list(seeds)
    batched = classifier == "linear" and torch_dtype(dtype) == torch.float64
    with (progress or no_progress)(len(shots) * len(seed_list), "few-shot draws") as advance:
        for n_shots in shots:
            draws = [
                sample_fewshot(
                    y_tr, m_tr, groups_train, n_shots, seed, kind, exclude_groups=exclude_groups
                )
                for seed in seed_list
            ]
            together = (
                _linear_draws(Xtr, y_tr, draws, Xte, kind, classes, linear_C) if batched else None
            )
            for i, (seed, draw) in enumerate(zip(seed_list, draws, strict=True)):
                scores = (
                    together[i]
                    if together is not None
                    else _fit_score(Xtr, y_tr, draw, Xte, kind, classes, classifier, linear_C,
                                    knn_k, dtype)
                )  # fmt: skip
                runs[(n_shots, seed)] = _evaluate(kind, y_te, m_te, scores, classes)
                advance(1)
    summary: dict[int, dict[str, dict[str, float]]] = {}
    for n_shots in shots:
        names = runs[(n_shots, seed_list[0])].keys() if seed_list else []
        summary[n_shots] = {
            name: _summarise([runs[(n_shots, s)][name] for s in seed_list]) for name in names
        }
    return FewShotResult(runs, summary)


def _fit_score(
    Xtr: NDArray[Any],
    y_tr: NDArray[Any],
    draw: FewShotDraw,
    Xte: NDArray[Any],
    kind: Literal["multilabel", "multiclass"],
    classes: NDArray[Any] | None,
    classifier: str,
    linear_C: float,
    knn_k: int,
    dtype: torch.dtype | str,
) -> NDArray[np.float64]:
    """Test scores of one draw's classifier, fitted alone."""
    X_d = np.asarray(Xtr[draw.indices])
    y_d = y_tr[draw.indices]
    if classifier == "linear":
        probe = LogisticProbe(C=linear_C, task=kind, dtype=dtype).fit(X_d, y_d, mask=draw.mask)
        scores = probe.predict_proba(Xte)
        if kind == "multiclass":  # align probe classes to all training classes
            assert classes is not None
            full = np.zeros((Xte.shape[0], classes.size))
            full[:, np.searchsorted(classes, probe.classes_)] = scores
            return full
        return scores
    if classifier == "prototype":
        return _prototype_scores(X_d, y_d, draw.mask, Xte, kind, classes)
    knn = KNNProbe(k=min(knn_k, draw.indices.size), task=kind, dtype=dtype)
    return knn.fit(X_d, y_d, mask=draw.mask).predict_proba(Xte)


def _evaluate(
    kind: str,
    y: NDArray[Any],
    m: NDArray[np.bool_],
    scores: NDArray[np.float64],
    classes: NDArray[Any] | None,
) -> dict[str, float]:
    if kind == "multilabel":
        return {
            "macro_auroc": M.macro_auroc(y, m, scores),
            "macro_ap": M.macro_ap(y, m, scores),
        }
    assert classes is not None
    codes = np.searchsorted(classes, y)
    known = m & (codes < classes.size)
    known[known] &= classes[codes[known]] == y[known]
    return M.evaluate_multiclass(np.where(known, codes, 0), known, scores)
