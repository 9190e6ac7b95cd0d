"""Other libraries as probe backends: scikit-learn (the CPU reference) and cuML (GPUs).

``backend="torch"`` (default) runs embedkit's own batched solvers and searches. With
``backend="sklearn"`` or ``"cuml"`` the linear probe solves each (label, C) problem with that
library's ``LogisticRegression`` (lbfgs / quasi-Newton, L2, the same scaled objective, the same
``tol`` and ``max_iter``) on the standardised features, and the kNN probe searches with its
``NearestNeighbors`` (brute force, cosine); the protocol around them (C path, validation choice,
refit, DINO's vote, records, metrics) is embedkit's. cuML is imported only when asked for (it
is in the ``gpu`` extra): a missing cuML or CUDA is a
:class:`~embedkit.errors.BackendUnavailableError`.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray

from embedkit.errors import BackendUnavailableError, ProbeInputError
from embedkit.probes.targets import Targets

__all__ = ["BACKENDS", "check_backend", "fit_logistic", "import_cuml", "neighbours"]

#: The probe backends, the default first.
BACKENDS = ("torch", "sklearn", "cuml")


def check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ProbeInputError(f"Invalid backend {backend!r}, choose one of {list(BACKENDS)}.")
    return backend


def import_cuml() -> ModuleType:
    """The ``cuml`` module, or a clear error when it or a CUDA GPU is missing."""
    if not torch.cuda.is_available():
        raise BackendUnavailableError(
            "backend='cuml' needs a CUDA GPU, and none is visible (torch.cuda.is_available() is "
            "False). Use backend='torch' (CPU or GPU) or backend='sklearn' (CPU)."
        )
    try:
        import cuml
    except ImportError as exc:
        raise BackendUnavailableError(
            f"backend='cuml' needs RAPIDS cuML, which cannot be imported ({exc}). Install the "
            "gpu extra (pip install 'embedkit[gpu]', which brings cuml-cu12) or use "
            "backend='torch'."
        ) from exc
    module: ModuleType = cuml
    return module


def _estimator(backend: str, C: float, tol: float, max_iter: int) -> Any:
    if backend == "cuml":
        return import_cuml().linear_model.LogisticRegression(
            penalty="l2", C=C, tol=tol, max_iter=max_iter, fit_intercept=True
        )
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(C=C, tol=tol, max_iter=max_iter)


def _n_iter(est: Any) -> int:
    return int(np.max(np.asarray(getattr(est, "n_iter_", 0))))


def fit_logistic(
    backend: str,
    X: NDArray[Any],
    targets: Targets,
    n_out: int,
    C: NDArray[np.float64],
    *,
    tol: float,
    max_iter: int,
) -> tuple[NDArray[np.float64], NDArray[np.int64], NDArray[np.bool_]]:
    """Standardised-space weights ``(D + 1, n_out)`` (intercepts last), iterations and convergence
    per problem of the L2-logistic problems of ``targets`` on the standardised rows ``X``, each
    at its ``C`` (one per label; one for a softmax problem), by the ``backend`` library.

    A two-class softmax is fitted as scikit-learn fits two classes, one sigmoid at ``2 C`` (the
    same optimum: the softmax's two weight vectors are opposite halves of the sigmoid's).
    """
    D = X.shape[1]
    W = np.zeros((D + 1, n_out))
    if targets.task == "multilabel":
        n_iter = np.zeros(n_out, dtype=np.int64)
        for j in range(n_out):
            rows = targets.mask[:, j]
            if not rows.any():
                continue
            est = _estimator(backend, float(C[j]), tol, max_iter).fit(X[rows], targets.y[rows, j])
            W[:-1, j] = np.asarray(est.coef_, dtype=np.float64).ravel()
            W[-1, j] = float(np.asarray(est.intercept_).ravel()[0])
            n_iter[j] = _n_iter(est)
        return W, n_iter, n_iter < max_iter
    rows = targets.mask
    two = n_out == 2
    est = _estimator(backend, float(C[0]) * (2.0 if two else 1.0), tol, max_iter)
    est.fit(X[rows], targets.y[rows])
    coef = np.asarray(est.coef_, dtype=np.float64)
    bias = np.asarray(est.intercept_, dtype=np.float64).ravel()
    if two:
        coef = np.vstack([-coef / 2, coef / 2])
        bias = np.array([-bias[0] / 2, bias[0] / 2])
    W[:-1] = coef.T
    W[-1] = bias
    it = _n_iter(est)
    return W, np.array([it], dtype=np.int64), np.array([it < max_iter])


def neighbours(
    backend: str, train: NDArray[Any], queries: NDArray[Any], k: int
) -> tuple[NDArray[np.float64], NDArray[np.int64]]:
    """Cosine similarities and indices ``(N, k)`` of the ``k`` nearest rows of ``train`` to each
    query (brute force), by the ``backend`` library's ``NearestNeighbors``."""
    if backend == "cuml":
        nn = import_cuml().neighbors.NearestNeighbors(n_neighbors=k, metric="cosine")
    else:
        from sklearn.neighbors import NearestNeighbors

        nn = NearestNeighbors(n_neighbors=k, algorithm="brute", metric="cosine")
    dist, idx = nn.fit(train).kneighbors(queries)
    return 1.0 - np.asarray(dist, dtype=np.float64), np.asarray(idx, dtype=np.int64)
