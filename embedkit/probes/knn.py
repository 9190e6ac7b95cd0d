"""Weighted k-nearest-neighbour probe (DINO / DINOv2 / DINOv3 kNN evaluation).

Protocol (the DINOv2 / DINOv3 kNN evaluation): L2-normalised features, cosine similarity, k in
{10, 20, 100, 200}, temperature 0.07, weights ``exp(sim / T)`` over the top k (softmax-like),
summed per class. For multi-label data the score of label l is the weighted vote of the positive
neighbours among the neighbours whose label l is valid (mask True), divided by their total weight;
a query with no valid neighbour for l gets the training prevalence of l. Multi-class scores are
the per-class weight sums divided by the total weight (they sum to 1; argmax as DINO's vote).

Exact and memory-bounded: queries go by blocks of ``block_size`` rows, the training set by blocks
too, and only the running top k per query is kept. Neighbours are ordered by similarity, ties
broken towards the lower training index, so results do not depend on the block sizes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import Any, Literal

import numpy as np
import torch
from numpy.typing import ArrayLike, NDArray
from sklearn.base import BaseEstimator, ClassifierMixin

from embedkit.errors import NotFittedError
from embedkit.probes.backends import (
    DEFAULT_MAX_RESIDENT_BYTES,
    ProbeInputError,
    block_rows_for,
    check_features,
    torch_dtype,
)
from embedkit.probes.external import check_backend, neighbours
from embedkit.probes.policies import ProbeBackend
from embedkit.probes.targets import check_targets
from embedkit.progress import ProgressFactory, no_progress

__all__ = ["DINO_KS", "KNNProbe"]

#: DINOv2 / DINOv3 kNN evaluation: k in {10, 20, 100, 200}, temperature 0.07.
DINO_KS: tuple[int, ...] = (10, 20, 100, 200)


def _ordered(sims: torch.Tensor, idx: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top k of each row by (similarity desc, index asc); candidates in any order."""
    order = torch.argsort(idx, dim=1, stable=True)
    sims, idx = sims.gather(1, order), idx.gather(1, order)
    order = torch.argsort(sims, dim=1, descending=True, stable=True)[:, :k]
    return sims.gather(1, order), idx.gather(1, order)


def _block_topk(sims: torch.Tensor, offset: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic top k of a (q, n) similarity block: among ties at the k-th value the lowest
    column indices win (``torch.topk`` alone leaves that unspecified).

    Fast path: one ``torch.topk`` of k + 1 values; only the rows whose k-th and (k + 1)-th values
    tie (where topk's choice among equal values could matter) go through the exact tie-aware
    selection."""
    k = min(k, sims.shape[1])
    if k == sims.shape[1]:
        cols = torch.arange(k, device=sims.device).expand(sims.shape[0], k)
        return _ordered(sims, cols + offset, k)
    vals, cols = torch.topk(sims, k + 1, dim=1, sorted=True)
    tied = vals[:, k - 1] == vals[:, k]
    s, i = _ordered(vals[:, :k], cols[:, :k] + offset, k)
    if bool(tied.any()):
        rows = tied.nonzero().flatten()
        s_t, i_t = _block_topk_exact(sims[rows], offset, k)
        s[rows], i[rows] = s_t, i_t
    return s, i


def _block_topk_exact(sims: torch.Tensor, offset: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Tie-aware top k: every value above the k-th, then the lowest columns among the ties."""
    kth = torch.topk(sims, k, dim=1).values[:, -1:]
    above = sims > kth
    tied = sims == kth
    need = k - above.sum(1, keepdim=True)
    chosen = above | (tied & (torch.cumsum(tied.int(), dim=1) <= need))
    cols = chosen.nonzero()[:, 1].reshape(sims.shape[0], k)
    return _ordered(sims.gather(1, cols), cols + offset, k)


class KNNProbe(ClassifierMixin, BaseEstimator):
    """Cosine kNN with DINO's temperature-weighted vote; see the module docstring.

    ``fit`` keeps a reference to the training features (no copy) and their inverse norms; the
    normalisation is applied per block in ``dtype`` (float32 default; float64 for exactness
    checks). ``predict_proba(X)`` returns the scores for the smallest k in ``k`` (the only one
    when ``k`` is an int), ``predict_proba(X, k=20)`` those for one k, and
    ``predict_proba_per_k(X)`` ``{k: scores}`` for every k in ``k`` from one neighbour search.

    ``backend``: ``"torch"`` (default, blocked exact search), ``"sklearn"`` or ``"cuml"`` (that
    library's brute-force cosine ``NearestNeighbors`` on a float32 copy of the training features;
    :mod:`embedkit.probes.external`); the vote is the same. ``progress``: a factory
    ``(total, description) -> context yielding advance(n)`` (:mod:`embedkit.progress`), advanced
    by the query rows of each block searched; None: no bar.

    A scikit-learn estimator (``get_params`` / ``set_params``, :func:`sklearn.base.clone`);
    fitted attributes end in ``_``; :class:`~embedkit.errors.NotFittedError` before ``fit``.
    """

    def __init__(
        self,
        k: int | Sequence[int] = DINO_KS,
        temperature: float = 0.07,
        block_size: int = 2048,
        device: str = "cpu",
        dtype: torch.dtype | str = "float32",
        task: Literal["auto", "multilabel", "multiclass"] = "auto",
        train_block_size: int | None = None,
        max_resident_bytes: int = DEFAULT_MAX_RESIDENT_BYTES,
        backend: ProbeBackend = "torch",
        progress: ProgressFactory | None = None,
    ) -> None:
        self.k = k
        self.temperature = temperature
        self.block_size = block_size
        self.device = device
        self.dtype = dtype
        self.task = task
        self.train_block_size = train_block_size
        self.max_resident_bytes = max_resident_bytes
        self.backend = backend
        self.progress = progress

    @property
    def _ks(self) -> list[int]:
        ks = [self.k] if isinstance(self.k, int) else list(self.k)
        if not ks or min(ks) < 1:
            raise ProbeInputError(f"Expected k >= 1, got {self.k}.")
        return sorted(set(ks))

    def fit(self, X: ArrayLike, y: ArrayLike, *, mask: ArrayLike | None = None) -> KNNProbe:
        """Remember the training features (by reference), labels and mask."""
        arr = check_features(X)
        y_arr = check_targets(y, arr.shape[0], "KNNProbe")
        task = (
            self.task
            if self.task != "auto"
            else ("multilabel" if y_arr.ndim == 2 else "multiclass")
        )
        m = np.ones(y_arr.shape, bool) if mask is None else np.asarray(mask, bool)
        if m.shape != y_arr.shape:
            raise ProbeInputError(f"Expected a mask of shape {y_arr.shape}, got {m.shape}.")
        dt = torch_dtype(self.dtype)
        dev = torch.device(self.device)
        self._X = arr
        self._X32: NDArray[np.float32] | None = None
        self._cache: tuple[int, list[tuple[int, torch.Tensor]]] | None = None
        rows = self.train_block_size or block_rows_for(arr.shape[1], 8)
        inv = np.empty(arr.shape[0])
        for lo in range(0, arr.shape[0], rows):
            block = arr[lo : lo + rows].astype(np.float64)
            inv[lo : lo + rows] = 1.0 / np.maximum(np.linalg.norm(block, axis=1), 1e-12)
        self._inv_norm = torch.as_tensor(inv, dtype=dt, device=dev)
        if task == "multiclass":
            self.classes_ = np.unique(y_arr[m])
            codes = np.searchsorted(self.classes_, y_arr)
            codes = np.where(m, np.minimum(codes, self.classes_.size - 1), 0)
            onehot = np.zeros((y_arr.shape[0], self.classes_.size))
            onehot[np.arange(y_arr.shape[0]), codes] = 1.0
            self._votes = torch.as_tensor(onehot * m[:, None], dtype=dt, device=dev)
            self._valid = torch.as_tensor(m[:, None].astype(np.float64), dtype=dt, device=dev)
        else:
            pos = np.where(m, y_arr == 1, False)
            self._votes = torch.as_tensor(pos.astype(np.float64), dtype=dt, device=dev)
            self._valid = torch.as_tensor(m.astype(np.float64), dtype=dt, device=dev)
            with np.errstate(invalid="ignore", divide="ignore"):
                prev = pos.sum(0) / m.sum(0)
            self.prevalence_ = np.where(m.sum(0) > 0, prev, 0.5)
        self.task_ = task
        self.n_features_in_ = arr.shape[1]
        return self

    def _check_fitted(self) -> None:
        if not hasattr(self, "_X"):
            raise NotFittedError("This KNNProbe is not fitted yet; call fit first.")

    def _check_query(self, X: ArrayLike) -> NDArray[Any]:
        self._check_fitted()
        arr = check_features(X)
        if arr.shape[1] != self.n_features_in_:
            raise ProbeInputError(
                f"X has {arr.shape[1]} features, but KNNProbe is expecting "
                f"{self.n_features_in_} features as input (as in fit)."
            )
        return arr

    def _normalise(self, block: NDArray[Any]) -> torch.Tensor:
        t = torch.from_numpy(np.ascontiguousarray(block)).to(
            device=torch.device(self.device), dtype=torch_dtype(self.dtype)
        )
        unit: torch.Tensor = t / t.norm(dim=1, keepdim=True).clamp_min(1e-12)
        return unit

    def _train_blocks(self, k: int) -> list[tuple[int, torch.Tensor]] | None:
        """Normalised training blocks ``(start, block)`` in the compute dtype, cached when they
        fit in ``max_resident_bytes``; None when they must be streamed."""
        n_train, n_features = self._X.shape
        itemsize = torch.empty((), dtype=torch_dtype(self.dtype)).element_size()
        if n_train * n_features * itemsize > self.max_resident_bytes:
            return None
        rows = self.train_block_size or max(k, 16384)
        cache = getattr(self, "_cache", None)
        if cache is None or cache[0] != rows:
            cache = (rows, [(lo, self._train_block(lo, rows)) for lo in range(0, n_train, rows)])
            self._cache = cache
        return cache[1]

    def _train_block(self, lo: int, rows: int) -> torch.Tensor:
        block = torch.from_numpy(np.ascontiguousarray(self._X[lo : lo + rows])).to(
            device=torch.device(self.device), dtype=torch_dtype(self.dtype)
        )
        return block * self._inv_norm[lo : lo + rows, None]

    def _search(self, Q: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Top k (sims, train indices) of normalised queries ``Q`` against all training rows."""
        if check_backend(self.backend) != "torch":
            if self._X32 is None:  # one float32 copy for the library
                self._X32 = np.asarray(self._X, dtype=np.float32)
            kk = min(k, self._X.shape[0])
            X32: NDArray[np.float32] = self._X32
            sims, idx = neighbours(self.backend, X32, Q.cpu().numpy(), kk)
            return torch.as_tensor(sims, dtype=Q.dtype, device=Q.device), torch.as_tensor(
                idx, device=Q.device
            )
        n_train = self._X.shape[0]
        rows = self.train_block_size or max(k, 16384)
        cached = self._train_blocks(k)
        blocks = (
            cached
            if cached is not None
            else ((lo, self._train_block(lo, rows)) for lo in range(0, n_train, rows))
        )
        best_s: torch.Tensor | None = None
        best_i: torch.Tensor | None = None
        for lo, block in blocks:
            s, i = _block_topk(Q @ block.T, lo, k)
            if best_s is None or best_i is None:
                best_s, best_i = s, i
            else:
                best_s, best_i = _ordered(torch.cat([best_s, s], 1), torch.cat([best_i, i], 1), k)
        assert best_s is not None and best_i is not None  # n_train >= 1 after fit
        return best_s, best_i

    def kneighbors(
        self, X: ArrayLike, k: int | None = None
    ) -> tuple[NDArray[np.float64], NDArray[np.int64]]:
        """Cosine similarities ``(N, k)`` and training indices ``(N, k)`` of the nearest neighbours,
        ordered by similarity (ties: lower index first)."""
        arr = self._check_query(X)
        kk = k or max(self._ks)
        kk = min(kk, self._X.shape[0])
        sims = np.empty((arr.shape[0], kk))
        idx = np.empty((arr.shape[0], kk), dtype=np.int64)
        with self._bar(arr.shape[0]) as advance:
            for lo in range(0, arr.shape[0], self.block_size):
                s, i = self._search(self._normalise(arr[lo : lo + self.block_size]), kk)
                sims[lo : lo + self.block_size] = s.double().cpu().numpy()
                idx[lo : lo + self.block_size] = i.cpu().numpy()
                advance(s.shape[0])
        return sims, idx

    def _bar(self, n_queries: int) -> AbstractContextManager[Callable[[int], None]]:
        return (self.progress or no_progress)(n_queries, "kNN search (queries)")

    def _scores(self, sims: torch.Tensor, idx: torch.Tensor, k: int) -> torch.Tensor:
        s, i = sims[:, :k], idx[:, :k]
        w = torch.exp((s - s[:, :1]) / self.temperature)  # exp(sim/T) up to a per-query factor
        votes = (w[:, :, None] * self._votes[i]).sum(1)
        total = (w[:, :, None] * self._valid[i]).sum(1)
        if self.task_ == "multiclass":
            return votes / total.clamp_min(torch.finfo(total.dtype).tiny)
        prev = torch.as_tensor(self.prevalence_, dtype=votes.dtype, device=votes.device)
        return torch.where(total > 0, votes / total.clamp_min(torch.finfo(total.dtype).tiny), prev)

    def predict_proba(self, X: ArrayLike, k: int | None = None) -> NDArray[np.float64]:
        """Scores ``(N, L)`` / ``(N, K)`` for ``k`` (default: the smallest configured k)."""
        kk = self._ks[0] if k is None else k
        return self._predict_ks(X, [kk])[kk]

    def predict_proba_per_k(self, X: ArrayLike) -> dict[int, NDArray[np.float64]]:
        """``{k: scores}`` for every configured k, from one neighbour search per query block."""
        return self._predict_ks(X, self._ks)

    def _predict_ks(self, X: ArrayLike, ks: list[int]) -> dict[int, NDArray[np.float64]]:
        arr = self._check_query(X)
        if min(ks) < 1:
            raise ProbeInputError(f"Expected k >= 1, got {min(ks)}.")
        k_max = min(max(ks), self._X.shape[0])
        out = {kk: np.empty((arr.shape[0], self._votes.shape[1])) for kk in ks}
        with self._bar(arr.shape[0]) as advance:
            for lo in range(0, arr.shape[0], self.block_size):
                sims, idx = self._search(self._normalise(arr[lo : lo + self.block_size]), k_max)
                for kk in ks:
                    scores = self._scores(sims, idx, min(kk, k_max))
                    out[kk][lo : lo + self.block_size] = scores.double().cpu().numpy()
                advance(sims.shape[0])
        return out

    def predict(self, X: ArrayLike, k: int | None = None) -> NDArray[Any]:
        """Multi-class: the class with the largest vote; multi-label: 0/1 per label (score >=
        0.5); for ``k`` or the smallest configured k."""
        proba = self.predict_proba(X, k=k)
        if self.task_ == "multilabel":
            return (proba >= 0.5).astype(np.int64)
        return np.asarray(self.classes_[np.argmax(proba, axis=1)])
