"""What fitted linear probes share: prediction by row blocks and validation scoring.

Weights are kept in standardised space (``(x - mean_) / scale_``); predictions fold the
statistics into the weights and run on the stored features by blocks
(:func:`~embedkit.probes.backends.fold_standardization`).
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import torch
from numpy.typing import ArrayLike, NDArray
from sklearn.base import BaseEstimator, ClassifierMixin

from embedkit.errors import NotFittedError
from embedkit.eval import metrics as M
from embedkit.probes.backends import (
    ProbeInputError,
    RowBlocks,
    Source,
    check_features,
    compute_threads,
    fold_standardization,
    stat_tensors,
    torch_dtype,
)
from embedkit.probes.targets import Targets

__all__ = ["LinearPredictor", "best_index", "logits", "val_scores"]


def logits(
    blocks: RowBlocks, W: torch.Tensor, mean: torch.Tensor | None, inv_scale: torch.Tensor | None
) -> NDArray[np.float64]:
    """``(N, Q)`` logits of the rows of ``blocks`` under standardised-space weights ``W``."""
    out = np.empty((blocks.n_rows, W.shape[1]), dtype=np.float64)
    with torch.no_grad():
        w, b = fold_standardization(W.to(blocks.dtype), mean, inv_scale)
        for start, stop, Xb in blocks:
            out[start:stop] = torch.addmm(b, Xb, w).double().cpu().numpy()
    return out


def val_scores(
    task: str, metric: str, targets: Targets, logits: NDArray[np.float64]
) -> tuple[NDArray[np.float64], float]:
    """(per-label scores, joint score) of validation logits."""
    if task == "multilabel":
        if metric == "auroc":
            per = M.per_label_auroc(targets.y, targets.mask, logits)
        else:  # log_loss
            loss = np.logaddexp(0.0, logits) - targets.y * logits
            m = targets.mask
            with np.errstate(invalid="ignore", divide="ignore"):
                per = np.where(m.any(0), (loss * m).sum(0) / m.sum(0), np.nan)
        return per, float(M.nanmean_or_nan(per))
    z = logits - logits.max(axis=1, keepdims=True)
    proba = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    if metric == "accuracy":
        val = M.accuracy(targets.y, proba, targets.mask)
    elif metric == "auroc":
        val = float(M.ovr_macro_auroc(targets.y, proba, targets.mask))
    else:
        logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
        rows = np.flatnonzero(targets.mask)
        val = float(-logp[rows, targets.y[rows]].mean()) if rows.size else float("nan")
    return np.array([val]), val


def best_index(values: NDArray[np.float64], lower_is_better: bool) -> int:
    """Index of the best non-NaN value, the first (smallest C / lr) among ties; -1 if all NaN."""
    v = -values if lower_is_better else values
    if np.isnan(v).all():
        return -1
    return int(np.nanargmax(v))


class LinearPredictor(ClassifierMixin, BaseEstimator):
    """Shared prediction code for linear probes (weights kept in standardised space).

    A scikit-learn estimator: constructor arguments are stored unchanged (``get_params`` /
    ``set_params``, so :func:`sklearn.base.clone` and ``GridSearchCV`` work), fitted attributes
    end in ``_``, and every prediction method raises :class:`~embedkit.errors.NotFittedError`
    before ``fit``.
    """

    task_: Literal["multilabel", "multiclass"]
    mean_: NDArray[np.float64] | None
    scale_: NDArray[np.float64] | None
    _W: torch.Tensor
    classes_: NDArray[Any]
    device: str
    dtype: torch.dtype | str

    def _check_fitted(self) -> None:
        if not hasattr(self, "_W"):
            raise NotFittedError(
                f"This {type(self).__name__} is not fitted yet; call fit or fit_select first."
            )

    @property
    def coef_(self) -> NDArray[np.float64]:
        """Weights ``(D, L)`` (multi-label) or ``(D, K)`` (multi-class) on the raw features."""
        self._check_fitted()
        w = self._W[:-1].double().cpu().numpy()
        return w if self.scale_ is None else w / self.scale_[:, None]

    @property
    def intercept_(self) -> NDArray[np.float64]:
        """Intercepts ``(L,)`` / ``(K,)`` on the raw features."""
        self._check_fitted()
        b = self._W[-1].double().cpu().numpy()
        return b if self.mean_ is None else b - self.mean_ @ self.coef_

    def _blocks(self, X: NDArray[Any]) -> RowBlocks:
        return RowBlocks(
            [Source(X)],
            dtype=torch_dtype(self.dtype),
            device=torch.device(self.device),
            max_resident_bytes=0,
        )

    def _logits(self, blocks: RowBlocks, W: torch.Tensor) -> NDArray[np.float64]:
        """Logits of standardised-space weights ``W`` with the fitted ``mean_`` / ``scale_``."""
        mean, inv = stat_tensors(self.mean_, self.scale_, blocks.dtype, blocks.device)
        return logits(blocks, W, mean, inv)

    def decision_function(self, X: ArrayLike) -> NDArray[np.float64]:
        """Logits ``(N, L)`` / ``(N, K)`` computed by row blocks."""
        self._check_fitted()
        arr = check_features(X)
        if arr.shape[1] != self._W.shape[0] - 1:
            raise ProbeInputError(
                f"X has {arr.shape[1]} features, but {type(self).__name__} is expecting "
                f"{self._W.shape[0] - 1} features as input (as in fit)."
            )
        with compute_threads(None, arr.size):  # one thread on small inputs, as in fit
            return self._logits(self._blocks(arr), self._W)

    def predict_proba(self, X: ArrayLike) -> NDArray[np.float64]:
        """Sigmoid per label (multi-label) or softmax over ``classes_`` (multi-class)."""
        z = self.decision_function(X)
        if self.task_ == "multilabel":
            return np.asarray(1.0 / (1.0 + np.exp(-z)))
        z = z - z.max(axis=1, keepdims=True)
        e = np.exp(z)
        return np.asarray(e / e.sum(axis=1, keepdims=True))

    def predict(self, X: ArrayLike) -> NDArray[Any]:
        """Multi-class: the most probable class of ``classes_``; multi-label: 0/1 per label
        (probability >= 0.5)."""
        proba = self.predict_proba(X)
        if self.task_ == "multilabel":
            return (proba >= 0.5).astype(np.int64)
        return np.asarray(self.classes_[np.argmax(proba, axis=1)])
