"""Targets and splits of the linear probes: validated labels, masks and hold-out rows.

Multi-label targets are ``(N, L)`` in {0, 1} with an ``(N, L)`` mask (masked entries may hold
anything and count for nothing); multi-class targets are ``(N,)`` labels, turned into codes into
the training classes. :func:`holdout_split` is DINOv2's 10% / seed 0 validation split, by patient
when groups are given.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from numpy.typing import ArrayLike, NDArray

from embedkit.probes.backends import ProbeInputError

__all__ = [
    "Targets",
    "Task",
    "check_targets",
    "holdout_split",
    "make_targets",
    "output_classes",
    "resolve_task",
]

Task = Literal["auto", "multilabel", "multiclass"]


@dataclass(frozen=True)
class Targets:
    """Targets as the solver wants them (masked entries zeroed, mask as 0/1 weights)."""

    task: Literal["multilabel", "multiclass"]
    y: NDArray[Any]  # (N, L) float64 in {0,1}, or (N,) int64 class codes
    mask: NDArray[np.bool_]  # (N, L) or (N,)

    @property
    def n_rows(self) -> int:
        return int(self.y.shape[0])


def check_targets(y: ArrayLike | None, n_rows: int, estimator: str) -> NDArray[Any]:
    """``y`` as an array of ``n_rows`` targets (a row per row of X), or a clear error."""
    if y is None:
        raise ProbeInputError(f"{estimator} requires y to be passed, but the target y is None.")
    arr = np.asarray(y)
    if arr.ndim not in (1, 2) or arr.shape[0] != n_rows:
        raise ProbeInputError(
            f"Expected targets of shape ({n_rows},) or ({n_rows}, L) like X, got {arr.shape}."
        )
    if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
        bad = np.flatnonzero(~np.isfinite(arr.reshape(arr.shape[0], -1)).all(axis=1))
        raise ProbeInputError(
            f"{estimator}: the targets hold NaN or Inf in {bad.size} rows (rows "
            f"{', '.join(map(str, bad[:5].tolist()))}); mark unknown targets with the mask "
            "instead (mask=False), not with NaN"
        )
    return arr


def resolve_task(task: Task, y: NDArray[Any]) -> Literal["multilabel", "multiclass"]:
    if task == "auto":
        return "multilabel" if y.ndim == 2 else "multiclass"
    if task not in ("multilabel", "multiclass"):
        raise ProbeInputError(
            f"Invalid task '{task}', choose one of ['auto', 'multilabel', 'multiclass']."
        )
    return task


def output_classes(
    task: Literal["multilabel", "multiclass"], y: NDArray[Any], mask: ArrayLike | None
) -> tuple[NDArray[Any] | None, int]:
    """(classes, number of outputs): the sorted valid training classes and their count for
    multi-class targets (at least 2 required), ``(None, L)`` for multi-label targets."""
    if task == "multilabel":
        return None, int(y.shape[1])
    m = np.ones(y.shape, bool) if mask is None else np.asarray(mask, bool)
    classes = np.unique(y[m])
    if classes.size < 2:
        raise ProbeInputError(
            f"Expected at least 2 classes among valid training targets, got {classes.tolist()}; "
            "a probe cannot be fitted on one class."
        )
    return classes, int(classes.size)


def make_targets(
    y: ArrayLike,
    mask: ArrayLike | None,
    task: Literal["multilabel", "multiclass"],
    n_rows: int,
    classes: NDArray[Any] | None = None,
) -> Targets:
    """Validate ``y`` / ``mask``; multi-class labels become codes into ``classes``."""
    y_arr = np.asarray(y)
    if y_arr.shape[0] != n_rows:
        raise ProbeInputError(f"Expected {n_rows} rows of targets like X, got {y_arr.shape[0]}.")
    if task == "multilabel":
        if y_arr.ndim != 2:
            raise ProbeInputError(f"Expected multi-label targets (N, L), got {y_arr.shape}.")
    elif y_arr.ndim != 1:
        raise ProbeInputError(f"Expected multi-class targets (N,), got {y_arr.shape}.")
    m = np.ones(y_arr.shape, bool) if mask is None else np.asarray(mask, dtype=bool)
    if m.shape != y_arr.shape:
        raise ProbeInputError(f"Expected a mask of shape {y_arr.shape}, got {m.shape} instead.")
    if task == "multilabel":
        valid = y_arr[m]
        if valid.size and not np.isin(valid, (0, 1)).all():
            raise ProbeInputError(
                "Expected multi-label targets in {0, 1} where the mask is True; mark uncertain "
                "entries False in the mask."
            )
        return Targets(task, np.where(m, y_arr, 0).astype(np.float64), m)
    assert classes is not None  # internal: callers pass the training classes
    codes = np.searchsorted(classes, y_arr[m])
    codes = np.minimum(codes, classes.size - 1)
    if (classes[codes] != y_arr[m]).any():
        unknown = sorted(set(np.unique(y_arr[m]).tolist()) - set(classes.tolist()))
        raise ProbeInputError(
            f"Classes {unknown[:10]} do not occur in the training targets {classes.tolist()}."
        )
    out = np.zeros(n_rows, dtype=np.int64)
    out[m] = codes
    return Targets(task, out, m)


def holdout_split(
    n: int, val_fraction: float = 0.1, seed: int = 0, groups: ArrayLike | None = None
) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    """(train rows, validation rows): a random ``val_fraction`` of the rows (DINOv2: 10%, seed 0).

    With ``groups`` (patient ids) whole groups go to one side, so no patient is in both.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ProbeInputError(f"Expected val_fraction in (0, 1), got {val_fraction}.")
    rng = np.random.default_rng(seed)
    if groups is None:
        perm = rng.permutation(n)
        n_val = max(1, round(n * val_fraction))
        return np.sort(perm[n_val:]), np.sort(perm[:n_val])
    g = np.asarray(groups)
    if g.shape != (n,):
        raise ProbeInputError(f"Expected groups of shape ({n},), got {g.shape} instead.")
    uniq, inverse = np.unique(g, return_inverse=True)
    chosen = rng.permutation(uniq.size)[: max(1, round(uniq.size * val_fraction))]
    is_val = np.isin(inverse, chosen)
    return np.flatnonzero(~is_val), np.flatnonzero(is_val)
