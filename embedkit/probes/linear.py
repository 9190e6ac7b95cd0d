"""Linear probes on frozen features: L2 logistic regression over a C path, and SGD linear heads.

:class:`LogisticProbe` follows DINOv2's ``log_regression`` protocol (PROTOCOLS.md "Probe
protocols"): L2 penalty, ``C = 10 ** linspace(-6, 5, 45)``, max_iter 1000, tol 1e-12, float64; C
chosen on a validation split (10% of train, seed 0, when none is given); the final model is refit
on train + validation. Per label the objective is scikit-learn's ``LogisticRegression(C=C)``::

    C * sum_i loss_i + 0.5 * ||w||^2          (intercept not penalised)

minimised in the equivalent scaled form ``mean_i loss_i + ||w||^2 / (2 C n)`` (as scikit-learn
does, so ``tol`` is a bound on the max-norm of that gradient, like scikit-learn's ``gtol``).
Multi-label = independent sigmoids (one-vs-rest, DINOv3's scikit-learn setup); masked entries
contribute nothing to a label's loss nor to its ``n``. Multi-class = softmax (multinomial).

The solver is a batched L-BFGS written on torch (CPU or CUDA): all labels are solved together,
one ``(D + 1, L)`` weight matrix, one matmul per pass over the data, but every label keeps its own
curvature history, step size (Armijo backtracking) and stopping test (gradient max-norm <= tol,
or relative decrease <= ftol = 64 * machine epsilon, scikit-learn / scipy's L-BFGS-B values), and
converged labels drop out of the matmuls. The C grid is swept as a warm-started path from strong
to weak regularisation. L-BFGS is preconditioned (``precondition="auto"``: up to 2,048 features)
with ``M = a E[x x^T] + I / (C n)`` per label (``a`` the mean logistic curvature; the second-moment
matrix from <= 32,768 strided rows, eigendecomposed once per fit): the objective, stopping rule
and optimum are unchanged, but embedding spectra no longer cost hundreds of iterations per C.

:class:`SGDLinearProbe` is the DINOv2 / DINOv3 linear-evaluation head grid: learning rates
{1e-5 ... 0.1} scaled by batch / 256, SGD with momentum 0.9, no weight decay, cosine schedule,
all heads trained together in one pass over the features, the head chosen on validation.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from numpy.typing import ArrayLike, NDArray

from embedkit.errors import NotFittedError
from embedkit.eval import metrics as M
from embedkit.probes.backends import (
    DEFAULT_MAX_RESIDENT_BYTES,
    ProbeInputError,
    RowBlocks,
    Source,
    check_features,
    column_stats,
    safe_scale,
    torch_dtype,
)

__all__ = [
    "DINOV2_CS",
    "DINO_LR_GRID",
    "LogisticProbe",
    "PathResult",
    "SGDLinearProbe",
    "holdout_split",
]

logger = logging.getLogger(__name__)

#: Rows (evenly strided) used to estimate the second-moment matrix of the preconditioner.
_PRECOND_ROWS = 32768
#: ``precondition="auto"`` uses the preconditioner up to this many features (a D x D matrix).
_PRECOND_MAX_FEATURES = 2048

#: DINOv2 ``log_regression``: C = 10 ** linspace(-6, 5, 45).
DINOV2_CS: NDArray[np.float64] = np.logspace(-6, 5, 45)
#: DINOv2 / DINOv3 linear eval learning-rate grid (before scaling by batch / 256).
DINO_LR_GRID: tuple[float, ...] = (
    1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 0.1,
)  # fmt: skip

Task = Literal["auto", "multilabel", "multiclass"]


# --------------------------------------------------------------------------- targets and splits


@dataclass(frozen=True)
class _Targets:
    """Targets as the solver wants them (masked entries zeroed, mask as 0/1 weights)."""

    task: Literal["multilabel", "multiclass"]
    y: NDArray[Any]  # (N, L) float64 in {0,1}, or (N,) int64 class codes
    mask: NDArray[np.bool_]  # (N, L) or (N,)

    @property
    def n_rows(self) -> int:
        return int(self.y.shape[0])


def _resolve_task(task: Task, y: NDArray[Any]) -> Literal["multilabel", "multiclass"]:
    if task == "auto":
        return "multilabel" if y.ndim == 2 else "multiclass"
    if task not in ("multilabel", "multiclass"):
        raise ProbeInputError(
            f"Invalid task '{task}', choose one of ['auto', 'multilabel', 'multiclass']."
        )
    return task


def _targets(
    y: ArrayLike,
    mask: ArrayLike | None,
    task: Literal["multilabel", "multiclass"],
    n_rows: int,
    classes: NDArray[Any] | None = None,
) -> _Targets:
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
        return _Targets(task, np.where(m, y_arr, 0).astype(np.float64), m)
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
    return _Targets(task, out, m)


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


# --------------------------------------------------------------------------- batched L-BFGS


class _Objective:
    """Scaled L2-logistic objective of P independent problems over columns of W ``(D + 1, Q)``.

    Multi-label: P = Q = L (problem l owns column l). Multi-class: P = 1 owning all K columns.
    """

    def __init__(self, blocks: RowBlocks, targets: _Targets, n_out: int) -> None:
        self.blocks = blocks
        self.multiclass = targets.task == "multiclass"
        dev, dt = blocks.device, blocks.dtype
        self.y = torch.as_tensor(targets.y, device=dev)
        if not self.multiclass:
            self.y = self.y.to(dt)
        self.m = torch.as_tensor(targets.mask, device=dev, dtype=dt)
        self.n_cols = n_out
        self.n_problems = 1 if self.multiclass else n_out
        self.problem_of_col = (
            torch.zeros(n_out, dtype=torch.long, device=dev)
            if self.multiclass
            else torch.arange(n_out, device=dev)
        )
        n_valid = self.m.sum(0) if not self.multiclass else self.m.sum().reshape(1)
        self.n_valid = n_valid
        # Mean logistic curvature sigma(z)(1 - sigma(z)) per column at the last evaluated point.
        self.curv = torch.full((n_out,), 0.25, dtype=dt, device=dev)
        self._eig: tuple[torch.Tensor, torch.Tensor] | None = None

    def eig(self, max_rows: int = _PRECOND_ROWS) -> tuple[torch.Tensor, torch.Tensor]:
        """Eigen-decomposition ``(s, V)`` of the second-moment matrix ``E[x x^T]`` of the design
        rows (in the solver's feature space), from at most ``max_rows`` evenly strided rows;
        computed once per objective in float64."""
        if self._eig is None:
            stride = max(1, math.ceil(self.blocks.n_rows / max_rows))
            D = self.blocks.n_features
            A = torch.zeros((D, D), dtype=torch.float64, device=self.blocks.device)
            count = 0
            for start, _stop, Xb in self.blocks:
                sub = Xb[(-start) % stride :: stride].to(torch.float64)
                A.addmm_(sub.T, sub)
                count += sub.shape[0]
            s, V = torch.linalg.eigh(A / max(count, 1))
            self._eig = (s.clamp_min(0.0).to(self.blocks.dtype), V.to(self.blocks.dtype))
        return self._eig

    def reduce(self, per_col: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """(Q,) -> (P,) by problem."""
        if not self.multiclass:
            return per_col
        return per_col.amax().reshape(1) if op == "max" else per_col.sum().reshape(1)

    def pdot(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.reduce((a * b).sum(0))

    def cols_of(self, problems: torch.Tensor) -> torch.Tensor:
        """Column indices owned by the problems flagged True in ``problems`` (P,)."""
        if not self.multiclass:
            return problems.nonzero().flatten()
        if bool(problems[0]):
            return torch.arange(self.n_cols, device=problems.device)
        return torch.empty(0, dtype=torch.long, device=problems.device)

    def value_grad(
        self, W: torch.Tensor, C: torch.Tensor, cols: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Objective (P,) (zero for problems not in ``cols``) and gradient for columns ``cols``.

        ``W`` is ``(D + 1, len(cols))``, ``C`` the C of each problem ``(P,)``.
        """
        w, b = W[:-1], W[-1]
        loss = torch.zeros(W.shape[1], dtype=W.dtype, device=W.device)
        curv = torch.zeros(W.shape[1], dtype=W.dtype, device=W.device)
        G = torch.zeros_like(W)
        for start, stop, Xb in self.blocks:
            Z = torch.addmm(b, Xb, w)
            if self.multiclass:
                mb = self.m[start:stop]
                yb = self.y[start:stop]
                lse = torch.logsumexp(Z, dim=1)
                loss[0] += ((lse - Z.gather(1, yb[:, None])[:, 0]) * mb).sum()
                R = torch.softmax(Z, dim=1)
                curv += ((R * (1.0 - R)) * mb[:, None]).sum(0)
                R[torch.arange(R.shape[0], device=R.device), yb] -= 1.0
                R *= mb[:, None]
            else:
                mb = self.m[start:stop][:, cols]
                yb = self.y[start:stop][:, cols]
                bce = F.binary_cross_entropy_with_logits(Z, yb, reduction="none")
                loss += (bce * mb).sum(0)
                P = torch.sigmoid(Z)
                curv += (P * (1.0 - P) * mb).sum(0)
                R = (P - yb) * mb
            G[:-1].addmm_(Xb.T, R)
            G[-1] += R.sum(0)
        prob = self.problem_of_col[cols]
        n = self.n_valid[prob]
        c = C[prob]
        penalty = (w * w).sum(0) / (2.0 * c * n)
        G /= n
        G[:-1] += w / (c * n)
        f = torch.zeros(self.n_problems, dtype=W.dtype, device=W.device)
        f.index_add_(0, prob, loss / n + penalty)
        self.last_curv = curv / n
        return f, G

    def precondition(
        self, Q: torch.Tensor, C: torch.Tensor, curv: torch.Tensor, cols: torch.Tensor
    ) -> torch.Tensor:
        """Apply ``M^-1`` to ``Q`` ``(D + 1, len(cols))``, where per column
        ``M = a E[x x^T] + I / (C n)`` on the weights and ``a`` on the intercept, ``a`` the mean
        logistic curvature: a positive-definite approximation of the Hessian (exact up to the
        per-sample curvature spread), used as L-BFGS's initial inverse Hessian."""
        s, V = self.eig()
        prob = self.problem_of_col[cols]
        lam = 1.0 / (C[prob] * self.n_valid[prob])
        a = curv.clamp_min(1e-6)
        out = torch.empty_like(Q)
        U = V.T @ Q[:-1]
        U /= s[:, None] * a[None, :] + lam[None, :]
        torch.matmul(V, U, out=out[:-1])
        out[-1] = Q[-1] / a
        return out


@dataclass
class _SolveInfo:
    n_iter: NDArray[np.int64]
    converged: NDArray[np.bool_]


def _lbfgs(
    obj: _Objective,
    W: torch.Tensor,
    C: torch.Tensor,
    *,
    max_iter: int,
    tol: float,
    history: int = 10,
    precondition: bool = True,
) -> tuple[torch.Tensor, _SolveInfo]:
    """Minimise every problem of ``obj`` from ``W`` (warm start); returns the new W and status."""
    dev, dt = W.device, W.dtype
    ftol = 64.0 * torch.finfo(dt).eps
    P = obj.n_problems
    W = W.clone()
    active = (obj.n_valid > 0).clone()
    converged = ~active
    n_iter = torch.zeros(P, dtype=torch.long, device=dev)
    f = torch.zeros(P, dtype=dt, device=dev)
    G = torch.zeros_like(W)
    all_cols = torch.arange(W.shape[1], device=dev)
    curv = obj.curv.clone()
    cols = obj.cols_of(active)
    if cols.numel():
        f_a, G_a = obj.value_grad(W[:, cols], C, cols)
        f = torch.where(active, f_a, f)
        G[:, cols] = G_a
        curv[cols] = obj.last_curv
    S: list[torch.Tensor] = []
    Yh: list[torch.Tensor] = []
    rho: list[torch.Tensor] = []
    gamma = torch.zeros(P, dtype=dt, device=dev)
    have_gamma = torch.zeros(P, dtype=torch.bool, device=dev)

    def expand(v: torch.Tensor) -> torch.Tensor:
        return v[obj.problem_of_col]

    for _ in range(max_iter):
        gmax = obj.reduce(G.abs().amax(0), op="max")
        done = active & (gmax <= tol)
        converged |= done
        active &= ~done
        if not bool(active.any()):
            break
        # Two-loop recursion, per problem (rho = 0 switches a pair off for a problem).
        q = -G
        alphas = []
        for s, y, r in zip(reversed(S), reversed(Yh), reversed(rho), strict=True):
            a = r * obj.pdot(s, q)
            alphas.append(a)
            q = q - expand(a) * y
        gnorm = torch.sqrt(obj.pdot(G, G)).clamp_min(torch.finfo(dt).tiny)
        if precondition:
            d = expand(torch.where(have_gamma, gamma, 1.0)) * obj.precondition(q, C, curv, all_cols)
        else:
            d = expand(torch.where(have_gamma, gamma, 1.0 / gnorm)) * q
        for s, y, r, a in zip(S, Yh, rho, reversed(alphas), strict=True):
            d = d + expand(a - r * obj.pdot(y, d)) * s
        gd = obj.pdot(G, d)
        not_descent = active & ~(gd < 0)
        if bool(not_descent.any()):  # reset the memory of those problems
            d0 = (
                -obj.precondition(G, C, curv, all_cols)
                if precondition
                else -G / expand(gnorm)[None, :]
            )
            d = torch.where(expand(not_descent)[None, :], d0, d)
            rho = [torch.where(not_descent, 0.0, r) for r in rho]
            have_gamma &= ~not_descent
            gd = obj.pdot(G, d)
        # Armijo backtracking with a step per problem; accepted problems leave the search.
        t = torch.ones(P, dtype=dt, device=dev)
        pending = active.clone()
        W_new, f_new, G_new, curv_new = W.clone(), f.clone(), G.clone(), curv.clone()
        for _ls in range(60):
            cols = obj.cols_of(pending)
            W_try = W[:, cols] + expand(t)[cols] * d[:, cols]
            f_try, G_try = obj.value_grad(W_try, C, cols)
            ok = pending & torch.isfinite(f_try) & (f_try <= f + 1e-4 * t * gd)
            ok_cols = ok[obj.problem_of_col[cols]]
            W_new[:, cols[ok_cols]] = W_try[:, ok_cols]
            G_new[:, cols[ok_cols]] = G_try[:, ok_cols]
            curv_new[cols[ok_cols]] = obj.last_curv[ok_cols]
            f_new = torch.where(ok, f_try, f_new)
            pending &= ~ok
            if not bool(pending.any()):
                break
            t = torch.where(pending, t * 0.5, t)
        stalled = pending  # no decrease found: at the limit of floating-point precision
        s_new = W_new - W
        y_new = G_new - G
        sy = obj.pdot(s_new, y_new)
        yy = obj.pdot(y_new, y_new)
        good = active & ~stalled & (sy > torch.finfo(dt).eps * yy) & (yy > 0)
        S.append(s_new)
        Yh.append(y_new)
        rho.append(torch.where(good, 1.0 / torch.where(good, sy, 1.0), 0.0))
        if len(S) > history:
            S.pop(0)
            Yh.pop(0)
            rho.pop(0)
        if precondition:  # H0 = gamma M^-1 with gamma = s'y / y'M^-1 y (preconditioned scaling)
            yHy = obj.pdot(y_new, obj.precondition(y_new, C, curv_new, all_cols))
            good &= yHy > 0
            gamma = torch.where(good, sy / torch.where(good, yHy, 1.0), gamma)
        else:
            gamma = torch.where(good, sy / torch.where(good, yy, 1.0), gamma)
        have_gamma |= good
        rel = (f - f_new) / torch.maximum(torch.maximum(f.abs(), f_new.abs()), torch.ones_like(f))
        small = active & ~stalled & (rel <= ftol)
        n_iter += active.long()
        W, f, G, curv = W_new, f_new, G_new, curv_new
        if bool(stalled.any()):
            logger.debug("L-BFGS line search stalled for problems %s", stalled.nonzero().tolist())
        converged |= small | stalled
        active &= ~(small | stalled)
    return W, _SolveInfo(n_iter.cpu().numpy(), converged.cpu().numpy())


# --------------------------------------------------------------------------- the probe


@dataclass(frozen=True)
class PathResult:
    """Validation scores along the C path and the choice made from them.

    ``scores[i, j]``: validation metric of label j (multi-label) at ``Cs[i]`` (one column for
    multi-class); ``score[i]``: the joint metric (macro over labels with both classes). For
    ``metric="log_loss"`` lower is better, otherwise higher. ``best_index[j]``: the index into
    ``Cs`` chosen for problem j (all equal under ``select="joint"``). Ties go to the smallest C.
    """

    Cs: NDArray[np.float64]
    scores: NDArray[np.float64]
    score: NDArray[np.float64]
    metric: str
    select: str
    best_index: NDArray[np.int64]
    n_iter: NDArray[np.int64]  # (n_C, P)
    converged: NDArray[np.bool_]  # (n_C, P)

    @property
    def C(self) -> NDArray[np.float64]:
        """The chosen C per problem (labels for multi-label, one value for multi-class)."""
        return self.Cs[self.best_index]


def _val_scores(
    task: str, metric: str, targets: _Targets, logits: NDArray[np.float64]
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


def _best(values: NDArray[np.float64], lower_is_better: bool) -> int:
    """Index of the best non-NaN value, the first (smallest C / lr) among ties; -1 if all NaN."""
    v = -values if lower_is_better else values
    if np.isnan(v).all():
        return -1
    return int(np.nanargmax(v))


class _Fitted:
    """Shared prediction code for linear probes (weights kept in standardised space)."""

    task_: Literal["multilabel", "multiclass"]
    mean_: NDArray[np.float64] | None
    scale_: NDArray[np.float64] | None
    _W: torch.Tensor
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

    def _blocks(self, X: NDArray[Any], *, resident: bool = False) -> RowBlocks:
        return RowBlocks(
            [Source(X)],
            dtype=torch_dtype(self.dtype),
            device=torch.device(self.device),
            mean=self.mean_,
            scale=None if self.scale_ is None else self.scale_,
            max_resident_bytes=DEFAULT_MAX_RESIDENT_BYTES if resident else 0,
        )

    def _logits(self, blocks: RowBlocks, W: torch.Tensor) -> NDArray[np.float64]:
        out = np.empty((blocks.n_rows, W.shape[1]), dtype=np.float64)
        with torch.no_grad():
            for start, stop, Xb in blocks:
                out[start:stop] = torch.addmm(W[-1], Xb, W[:-1]).double().cpu().numpy()
        return out

    def decision_function(self, X: ArrayLike) -> NDArray[np.float64]:
        """Logits ``(N, L)`` / ``(N, K)`` computed by row blocks."""
        self._check_fitted()
        arr = check_features(X)
        if arr.shape[1] != self._W.shape[0] - 1:
            raise ProbeInputError(
                f"Expected {self._W.shape[0] - 1} features as in fit, got {arr.shape[1]}."
            )
        return self._logits(self._blocks(arr), self._W)

    def predict_proba(self, X: ArrayLike) -> NDArray[np.float64]:
        """Sigmoid per label (multi-label) or softmax over ``classes_`` (multi-class)."""
        z = self.decision_function(X)
        if self.task_ == "multilabel":
            return np.asarray(1.0 / (1.0 + np.exp(-z)))
        z = z - z.max(axis=1, keepdims=True)
        e = np.exp(z)
        return np.asarray(e / e.sum(axis=1, keepdims=True))


class LogisticProbe(_Fitted):
    """L2 logistic regression probe with DINOv2's C grid, solved as one batched torch problem.

    Parameters follow DINOv2 ``log_regression`` (PROTOCOLS.md): ``Cs`` = 10 ** linspace(-6, 5, 45),
    ``max_iter`` 1000 (per C), ``tol`` 1e-12, float64, validation split 10% / seed 0 when ``fit``
    gets no validation data, refit on train + val.

    - ``C``: if set, :meth:`fit` trains at this C without any selection.
    - ``standardize``: features are centred and scaled to unit variance with statistics computed by
      row blocks in float64 from the (float16 / float32) input (``mean_``, ``scale_``; constant
      features get scale 1). The penalty then acts on standardised weights; ``coef_`` and
      ``intercept_`` are reported on the raw features. Strongly recommended for embeddings
      (decaying spectrum, non-zero mean): without it L-BFGS needs many more iterations.
    - ``select``: ``"joint"`` (default) picks one C for all labels by the macro validation metric,
      as DINOv2 picks one C; ``"per_label"`` picks a C per label (multi-label only).
    - ``metric``: ``"auto"`` = AUROC for multi-label (macro over labels with both classes),
      accuracy for multi-class (DINOv2); also ``"log_loss"`` and, for multi-class, ``"auroc"``
      (one-vs-rest macro).
    - ``device`` / ``dtype``: where and in which precision the solver runs (``"cuda"`` for GPUs).

    Fitted attributes: ``C_`` (float; ``(L,)`` under per-label selection), ``coef_`` ``(D, L)``,
    ``intercept_``, ``mean_`` / ``scale_``, ``path_`` (:class:`PathResult`, after selection),
    ``n_iter_`` / ``converged_`` per problem, ``classes_`` (multi-class).
    """

    C_: float | NDArray[np.float64]

    def __init__(
        self,
        Cs: ArrayLike = DINOV2_CS,
        C: float | None = None,
        *,
        standardize: bool = True,
        max_iter: int = 1000,
        tol: float = 1e-12,
        device: str = "cpu",
        dtype: torch.dtype | str = torch.float64,
        task: Task = "auto",
        select: Literal["joint", "per_label"] = "joint",
        metric: Literal["auto", "auroc", "accuracy", "log_loss"] = "auto",
        val_fraction: float = 0.1,
        seed: int = 0,
        history: int = 10,
        max_resident_bytes: int = DEFAULT_MAX_RESIDENT_BYTES,
        precondition: bool | Literal["auto"] = "auto",
    ) -> None:
        self.Cs = Cs
        self.C = C
        self.standardize = standardize
        self.max_iter = max_iter
        self.tol = tol
        self.device = device
        self.dtype = dtype
        self.task = task
        self.select = select
        self.metric = metric
        self.val_fraction = val_fraction
        self.seed = seed
        self.history = history
        self.max_resident_bytes = max_resident_bytes
        self.precondition = precondition

    # ---- helpers
    def _sorted_cs(self) -> NDArray[np.float64]:
        cs = np.sort(np.asarray(self.Cs, dtype=np.float64).ravel())
        if cs.size == 0 or (cs <= 0).any():
            raise ProbeInputError(f"Expected positive C values, got {cs.tolist()[:5]}...")
        return cs

    def _metric(self, task: str) -> str:
        if self.metric == "auto":
            return "auroc" if task == "multilabel" else "accuracy"
        allowed = (
            ("auroc", "log_loss") if task == "multilabel" else ("auroc", "accuracy", "log_loss")
        )
        if self.metric not in allowed:
            raise ProbeInputError(
                f"Invalid metric '{self.metric}' for {task} targets, choose one of {list(allowed)}."
            )
        return self.metric

    def _stats(
        self, sources: Sequence[Source]
    ) -> tuple[NDArray[np.float64] | None, NDArray[np.float64] | None]:
        if not self.standardize:
            return None, None
        mean, std = column_stats(sources)
        return mean, safe_scale(std)

    def _objective(
        self,
        sources: Sequence[Source],
        targets: _Targets,
        n_out: int,
        mean: NDArray[np.float64] | None,
        scale: NDArray[np.float64] | None,
    ) -> _Objective:
        blocks = RowBlocks(
            sources,
            dtype=torch_dtype(self.dtype),
            device=torch.device(self.device),
            mean=mean,
            scale=scale,
            max_resident_bytes=self.max_resident_bytes,
        )
        return _Objective(blocks, targets, n_out)

    def _setup(
        self, X: ArrayLike, y: ArrayLike, mask: ArrayLike | None
    ) -> tuple[NDArray[Any], Literal["multilabel", "multiclass"], NDArray[Any] | None, int]:
        arr = check_features(X)
        y_arr = np.asarray(y)
        task = _resolve_task(self.task, y_arr)
        if task == "multiclass":
            m = np.ones(y_arr.shape, bool) if mask is None else np.asarray(mask, bool)
            classes = np.unique(y_arr[m])
            if classes.size < 2:
                raise ProbeInputError(
                    f"Expected at least 2 classes among valid training targets, got "
                    f"{classes.tolist()}."
                )
            return arr, task, classes, int(classes.size)
        return arr, task, None, int(y_arr.shape[1])

    def _check_labels(self, targets: _Targets) -> None:
        if targets.task != "multilabel":
            return
        m = targets.mask
        n_pos = (targets.y * m).sum(0)
        bad = np.flatnonzero((m.sum(0) > 0) & ((n_pos == 0) | (n_pos == m.sum(0))))
        if bad.size:
            raise ProbeInputError(
                f"Labels {bad.tolist()} have a single class among their valid training entries; "
                "a logistic probe cannot be fitted for them. Drop those labels or mask them out "
                "entirely."
            )

    def _solve(
        self, obj: _Objective, W0: torch.Tensor, C: NDArray[np.float64]
    ) -> tuple[torch.Tensor, _SolveInfo]:
        C_t = torch.as_tensor(C, dtype=W0.dtype, device=W0.device)
        if self.precondition not in (True, False, "auto"):
            raise ProbeInputError(
                f"Invalid precondition {self.precondition!r}, choose one of [True, False, 'auto']."
            )
        use = self.precondition is True or (
            self.precondition == "auto" and obj.blocks.n_features <= _PRECOND_MAX_FEATURES
        )
        return _lbfgs(
            obj,
            W0,
            C_t,
            max_iter=self.max_iter,
            tol=self.tol,
            history=self.history,
            precondition=use,
        )

    def _store(
        self,
        W: torch.Tensor,
        info: _SolveInfo,
        task: Literal["multilabel", "multiclass"],
        classes: NDArray[Any] | None,
        mean: NDArray[np.float64] | None,
        scale: NDArray[np.float64] | None,
    ) -> None:
        self._W = W
        self.task_ = task
        self.mean_ = mean
        self.scale_ = scale
        self.n_iter_ = info.n_iter
        self.converged_ = info.converged
        self.n_features_in_ = int(W.shape[0] - 1)
        if classes is not None:
            self.classes_ = classes
        if not info.converged.all():
            logger.warning(
                "LogisticProbe: %d of %d problems reached max_iter=%d without converging",
                int((~info.converged).sum()),
                info.converged.size,
                self.max_iter,
            )

    # ---- public API
    def fit(
        self,
        X: ArrayLike,
        y: ArrayLike,
        mask: ArrayLike | None = None,
        groups: ArrayLike | None = None,
    ) -> LogisticProbe:
        """Fit at ``C`` if set; otherwise choose C on a held-out ``val_fraction`` of the rows
        (whole ``groups`` per side when given; DINOv2: 10%, seed 0) and refit on all rows."""
        arr = check_features(X)
        if self.C is None:
            tr, va = holdout_split(arr.shape[0], self.val_fraction, self.seed, groups)
            y_arr = np.asarray(y)
            m_arr = None if mask is None else np.asarray(mask, bool)
            return self._fit_select_sources(
                [Source(arr, tr)],
                y_arr[tr],
                None if m_arr is None else m_arr[tr],
                [Source(arr, va)],
                y_arr[va],
                None if m_arr is None else m_arr[va],
            )
        arr, task, classes, n_out = self._setup(arr, y, mask)
        targets = _targets(y, mask, task, arr.shape[0], classes)
        self._check_labels(targets)
        sources = [Source(arr)]
        mean, scale = self._stats(sources)
        obj = self._objective(sources, targets, n_out, mean, scale)
        W0 = torch.zeros(
            (arr.shape[1] + 1, n_out), dtype=obj.blocks.dtype, device=obj.blocks.device
        )
        W, info = self._solve(obj, W0, np.full(obj.n_problems, float(self.C)))
        self._store(W, info, task, classes, mean, scale)
        self.C_ = float(self.C)
        return self

    def fit_path(
        self,
        X_train: ArrayLike,
        y_train: ArrayLike,
        mask_train: ArrayLike | None,
        X_val: ArrayLike,
        y_val: ArrayLike,
        mask_val: ArrayLike | None,
    ) -> PathResult:
        """Fit the warm-started C path on train and score every C on validation (no refit)."""
        return self._path(
            [Source(check_features(X_train))],
            y_train,
            mask_train,
            [Source(check_features(X_val, "X_val"))],
            y_val,
            mask_val,
        )[0]

    def _path(
        self,
        train: Sequence[Source],
        y_train: ArrayLike,
        mask_train: ArrayLike | None,
        val: Sequence[Source],
        y_val: ArrayLike,
        mask_val: ArrayLike | None,
    ) -> tuple[PathResult, list[torch.Tensor], dict[str, Any]]:
        n_tr = sum(s.n_rows for s in train)
        n_va = sum(s.n_rows for s in val)
        y_tr = np.asarray(y_train)
        task = _resolve_task(self.task, y_tr)
        if task == "multiclass":
            m = np.ones(y_tr.shape, bool) if mask_train is None else np.asarray(mask_train, bool)
            classes: NDArray[Any] | None = np.unique(y_tr[m])
            n_out = int(classes.size)  # type: ignore[union-attr]
            if n_out < 2:
                raise ProbeInputError("Expected at least 2 classes among valid training targets.")
        else:
            classes, n_out = None, int(y_tr.shape[1])
        if self.select not in ("joint", "per_label"):
            raise ProbeInputError(
                f"Invalid select '{self.select}', choose one of ['joint', 'per_label']."
            )
        if self.select == "per_label" and task == "multiclass":
            raise ProbeInputError(
                "select='per_label' needs multi-label targets; multi-class softmax has one C. "
                "Use select='joint'."
            )
        metric = self._metric(task)
        t_tr = _targets(y_train, mask_train, task, n_tr, classes)
        t_va = _targets(y_val, mask_val, task, n_va, classes)
        self._check_labels(t_tr)
        mean, scale = self._stats(train)
        obj = self._objective(train, t_tr, n_out, mean, scale)
        val_blocks = RowBlocks(
            val,
            dtype=obj.blocks.dtype,
            device=obj.blocks.device,
            mean=mean,
            scale=scale,
            max_resident_bytes=self.max_resident_bytes,
        )
        cs = self._sorted_cs()
        W = torch.zeros((obj.blocks.n_features + 1, n_out), dtype=obj.blocks.dtype)
        W = W.to(obj.blocks.device)
        Ws, per, joint, iters, conv = [], [], [], [], []
        for c in cs:
            W, info = self._solve(obj, W, np.full(obj.n_problems, c))
            Ws.append(W)
            p, j = _val_scores(task, metric, t_va, self._logits(val_blocks, W))
            per.append(p)
            joint.append(j)
            iters.append(info.n_iter)
            conv.append(info.converged)
        scores = np.array(per)
        score = np.array(joint)
        lower = metric == "log_loss"
        best_joint = _best(score, lower)
        if best_joint < 0:
            raise ProbeInputError(
                f"The validation {metric} is undefined at every C (no label has both classes among "
                "its valid validation entries); use a larger validation split."
            )
        best = np.full(obj.n_problems, best_joint, dtype=np.int64)
        if self.select == "per_label":
            for j in range(obj.n_problems):
                b = _best(scores[:, j], lower)
                best[j] = best_joint if b < 0 else b
        result = PathResult(
            Cs=cs,
            scores=scores,
            score=score,
            metric=metric,
            select=self.select,
            best_index=best,
            n_iter=np.array(iters),
            converged=np.array(conv),
        )
        extra = {"task": task, "classes": classes, "n_out": n_out, "mean": mean, "scale": scale}
        return result, Ws, extra

    def fit_select(
        self,
        X_train: ArrayLike,
        y_train: ArrayLike,
        mask_train: ArrayLike | None,
        X_val: ArrayLike,
        y_val: ArrayLike,
        mask_val: ArrayLike | None,
    ) -> LogisticProbe:
        """Choose C on validation along the path (``path_``), then refit on train + val at the
        chosen C (``C_``: float under joint selection, ``(L,)`` under per-label), warm-started
        from the path solution. Train and val are streamed together, never concatenated."""
        return self._fit_select_sources(
            [Source(check_features(X_train))],
            y_train,
            mask_train,
            [Source(check_features(X_val, "X_val"))],
            y_val,
            mask_val,
        )

    def _fit_select_sources(
        self,
        train: Sequence[Source],
        y_train: ArrayLike,
        mask_train: ArrayLike | None,
        val: Sequence[Source],
        y_val: ArrayLike,
        mask_val: ArrayLike | None,
    ) -> LogisticProbe:
        path, Ws, extra = self._path(train, y_train, mask_train, val, y_val, mask_val)
        task, classes, n_out = extra["task"], extra["classes"], extra["n_out"]
        both = [*train, *val]
        n_all = sum(s.n_rows for s in both)
        y_all = np.concatenate([np.asarray(y_train), np.asarray(y_val)])
        m_tr = np.ones(np.shape(y_train), bool) if mask_train is None else mask_train
        m_va = np.ones(np.shape(y_val), bool) if mask_val is None else mask_val
        m_all = np.concatenate([np.asarray(m_tr, bool), np.asarray(m_va, bool)])
        targets = _targets(y_all, m_all, task, n_all, classes)
        mean, scale = self._stats(both)
        obj = self._objective(both, targets, n_out, mean, scale)
        # Warm start: the chosen path weights, moved from train-only to train+val standardisation.
        prob_of_col = obj.problem_of_col.cpu().numpy()
        W_std = np.stack(
            [
                Ws[path.best_index[prob_of_col[q]]][:, q].double().cpu().numpy()
                for q in range(n_out)
            ],
            axis=1,
        )
        coef = W_std[:-1] / (1.0 if extra["scale"] is None else extra["scale"][:, None])
        bias = W_std[-1] - (0.0 if extra["mean"] is None else extra["mean"] @ coef)
        w0 = coef * (1.0 if scale is None else scale[:, None])
        b0 = bias + (0.0 if mean is None else mean @ coef)
        W0 = torch.as_tensor(np.vstack([w0, b0[None, :]]), dtype=obj.blocks.dtype)
        C = path.Cs[path.best_index]
        W, info = self._solve(obj, W0.to(obj.blocks.device), C)
        self._store(W, info, task, classes, mean, scale)
        self.path_ = path
        self.C_ = float(C[0]) if self.select == "joint" else C
        return self


# --------------------------------------------------------------------------- SGD linear heads


class SGDLinearProbe(_Fitted):
    """The DINOv2 / DINOv3 linear-evaluation head grid, trained in one pass over the features.

    One linear head per learning rate in ``lrs`` (DINOv2 / DINOv3 grid {1e-5, ..., 0.1}), each
    scaled by ``batch_size / 256``; SGD with momentum 0.9, no weight decay, cosine schedule to 0
    over ``epochs``, heads initialised N(0, 0.01) with zero bias (DINOv2 ``LinearClassifier``).
    All heads see the same mini-batches (a batched ``(H, D, L)`` weight) and the head with the best
    validation metric (macro AUROC multi-label, accuracy multi-class; ties to the smaller lr) is
    kept; there is no refit. Loss: masked BCE-with-logits averaged over valid entries
    (multi-label), cross-entropy over valid rows (multi-class). ``standardize`` is off by default,
    as in the reference code.
    """

    def __init__(
        self,
        lrs: Sequence[float] = DINO_LR_GRID,
        *,
        batch_size: int = 256,
        epochs: int = 10,
        momentum: float = 0.9,
        standardize: bool = False,
        task: Task = "auto",
        metric: Literal["auto", "auroc", "accuracy", "log_loss"] = "auto",
        val_fraction: float = 0.1,
        device: str = "cpu",
        dtype: torch.dtype | str = torch.float32,
        seed: int = 0,
    ) -> None:
        self.lrs = lrs
        self.batch_size = batch_size
        self.epochs = epochs
        self.momentum = momentum
        self.standardize = standardize
        self.task = task
        self.metric = metric
        self.val_fraction = val_fraction
        self.device = device
        self.dtype = dtype
        self.seed = seed

    def fit(
        self,
        X: ArrayLike,
        y: ArrayLike,
        mask: ArrayLike | None = None,
        groups: ArrayLike | None = None,
    ) -> SGDLinearProbe:
        """Hold out ``val_fraction`` of the rows (by ``groups`` if given), then fit_select."""
        arr = check_features(X)
        tr, va = holdout_split(arr.shape[0], self.val_fraction, self.seed, groups)
        y_arr = np.asarray(y)
        m_arr = np.ones(y_arr.shape, bool) if mask is None else np.asarray(mask, bool)
        return self._fit(arr, tr, y_arr[tr], m_arr[tr], arr, va, y_arr[va], m_arr[va])

    def fit_select(
        self,
        X_train: ArrayLike,
        y_train: ArrayLike,
        mask_train: ArrayLike | None,
        X_val: ArrayLike,
        y_val: ArrayLike,
        mask_val: ArrayLike | None,
    ) -> SGDLinearProbe:
        """Train every head on train, keep the best one on validation."""
        xt, xv = check_features(X_train), check_features(X_val, "X_val")
        return self._fit(
            xt, np.arange(xt.shape[0]), y_train, mask_train, xv, np.arange(xv.shape[0]), y_val,
            mask_val,
        )  # fmt: skip

    def _fit(
        self,
        X_tr: NDArray[Any],
        rows_tr: NDArray[np.int64],
        y_train: ArrayLike,
        mask_train: ArrayLike | None,
        X_va: NDArray[Any],
        rows_va: NDArray[np.int64],
        y_val: ArrayLike,
        mask_val: ArrayLike | None,
    ) -> SGDLinearProbe:
        y_tr = np.asarray(y_train)
        task = _resolve_task(self.task, y_tr)
        classes: NDArray[Any] | None = None
        if task == "multiclass":
            m = np.ones(y_tr.shape, bool) if mask_train is None else np.asarray(mask_train, bool)
            classes = np.unique(y_tr[m])
            n_out = int(classes.size)
        else:
            n_out = int(y_tr.shape[1])
        metric = "auroc" if self.metric == "auto" and task == "multilabel" else self.metric
        metric = "accuracy" if metric == "auto" else metric
        t_tr = _targets(y_train, mask_train, task, rows_tr.size, classes)
        t_va = _targets(y_val, mask_val, task, rows_va.size, classes)
        src_tr = Source(X_tr, rows_tr)
        mean, scale = column_stats([src_tr]) if self.standardize else (None, None)
        scale = None if scale is None else safe_scale(scale)
        self.mean_, self.scale_ = mean, scale
        dev, dt = torch.device(self.device), torch_dtype(self.dtype)
        gen = torch.Generator().manual_seed(self.seed)
        lrs = torch.tensor([lr * self.batch_size / 256.0 for lr in self.lrs], dtype=dt, device=dev)
        H, D = lrs.numel(), X_tr.shape[1]
        W = (torch.randn((H, D + 1, n_out), generator=gen, dtype=dt) * 0.01).to(dev)
        W[:, -1] = 0.0
        buf = torch.zeros_like(W)
        y_t = torch.as_tensor(t_tr.y, device=dev)
        m_t = torch.as_tensor(t_tr.mask, device=dev, dtype=dt)
        if task == "multilabel":
            y_t = y_t.to(dt)
        blocks_tr = RowBlocks([src_tr], dtype=dt, device=dev, mean=mean, scale=scale)
        n = rows_tr.size
        steps_per_epoch = math.ceil(n / self.batch_size)
        total = steps_per_epoch * self.epochs
        rng = np.random.default_rng(self.seed)
        step = 0
        for _ in range(self.epochs):
            perm = rng.permutation(n)
            for lo in range(0, n, self.batch_size):
                idx = np.sort(perm[lo : lo + self.batch_size])
                Xb = blocks_tr._convert(src_tr.read_rows(idx))
                Wr = W.detach().requires_grad_(True)
                Z = torch.matmul(Xb, Wr[:, :-1]) + Wr[:, -1:, :]  # (H, B, Q)
                ib = torch.as_tensor(idx, device=dev)
                mb = m_t[ib]
                if task == "multilabel":
                    bce = F.binary_cross_entropy_with_logits(
                        Z, y_t[ib].expand_as(Z), reduction="none"
                    )
                    loss = (bce * mb).sum() / mb.sum().clamp_min(1.0)
                else:
                    ce = F.cross_entropy(
                        Z.reshape(-1, n_out), y_t[ib].repeat(H), reduction="none"
                    ).reshape(H, -1)
                    loss = (ce * mb).sum() / mb.sum().clamp_min(1.0)
                (grad,) = torch.autograd.grad(loss, Wr)
                factor = 0.5 * (1.0 + math.cos(math.pi * step / total))
                with torch.no_grad():
                    buf.mul_(self.momentum).add_(grad)
                    W -= (lrs * factor)[:, None, None] * buf
                step += 1
        blocks_va = RowBlocks([Source(X_va, rows_va)], dtype=dt, device=dev, mean=mean, scale=scale)
        scores, joint = [], []
        for h in range(H):
            p, j = _val_scores(task, metric, t_va, self._logits(blocks_va, W[h]))
            scores.append(p)
            joint.append(j)
        best = _best(np.array(joint), metric == "log_loss")
        if best < 0:
            raise ProbeInputError(f"The validation {metric} is undefined for every head.")
        self._W = W[best].clone()
        self.task_ = task
        if classes is not None:
            self.classes_ = classes
        self.lr_ = float(self.lrs[best])
        self.lr_scaled_ = float(lrs[best])
        self.val_scores_ = dict(zip([float(v) for v in self.lrs], joint, strict=True))
        self.val_per_label_ = np.array(scores)
        self.n_features_in_ = D
        return self
