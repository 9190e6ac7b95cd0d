"""Small problems in numpy float64: the batched Newton-CG of :mod:`embedkit.probes.newton` on the
standardised rows held in memory.

Same objective (:mod:`embedkit.probes.objective`: scikit-learn's ``LogisticRegression(C=C)`` per
label, masked sigmoids or one softmax), same method (conjugate gradients preconditioned by the
inverses of the exact per-column Hessian blocks, reused along the C path until CG needs more than
:data:`~embedkit.probes.newton.REFRESH_CG_STEPS` steps; Eisenstat-Walker forcing; Armijo steps)
and same stopping rule (:class:`~embedkit.probes.lbfgs.Convergence`). What differs is the cost
of a small call: on one thread a pass over 1,300 x 65 float64 rows takes ~60 us as a numpy
matmul against ~200 us through torch, and an iteration makes tens of such calls, so on small
problems the torch solver is dominated by per-call overhead (benchmarks/RESULTS.md, "Probe
solvers"). :class:`~embedkit.probes.linear.LogisticProbe` takes this path up to
:data:`DENSE_MAX_VALUES` standardised values (measured crossover) and 256 features.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from typing import Any

import numpy as np
from numpy.typing import NDArray
from scipy.linalg import lapack
from scipy.special import expit

from embedkit.probes.lbfgs import Convergence, SolveInfo
from embedkit.probes.newton import MAX_CG, MAX_HALVINGS, REFRESH_CG_STEPS
from embedkit.probes.targets import Targets

__all__ = ["DENSE_MAX_VALUES", "DenseLogistic", "blas_threads", "dense_newton", "with_ones"]

#: Rows x (features + 1) up to which ``LogisticProbe`` solves in numpy (see the module docstring).
DENSE_MAX_VALUES = 1 << 21

Array = NDArray[np.float64]


def with_ones(X: Array) -> Array:
    """``[X, 1]``: the rows with a column of ones for the intercept."""
    Xa = np.empty((X.shape[0], X.shape[1] + 1))
    Xa[:, :-1] = X
    Xa[:, -1] = 1.0
    return Xa


@lru_cache(maxsize=1)
def _blas() -> Any:
    from threadpoolctl import ThreadpoolController  # scikit-learn's dependency

    return ThreadpoolController()  # inspecting the loaded libraries once costs ~1.5 ms


@contextmanager
def blas_threads(n: int) -> Iterator[None]:
    """numpy's BLAS on ``n`` threads inside the block (one for small problems, as the torch path:
    each call is too short to split, and a multi-threaded loop collapses on a busy node)."""
    with _blas().limit(limits=n, user_api="blas"):
        yield


class DenseLogistic:
    """The scaled L2-logistic objective of :class:`~embedkit.probes.objective.LogisticObjective`
    on standardised rows held in memory (float64), with every column evaluated at once.

    ``Xa`` ``(N, D + 1)``: standardised rows with a last column of ones. Multi-label
    (``n_classes`` None): problem q owns column q, ``Y`` / ``m`` ``(N, Q)`` targets in {0, 1} and
    0/1 weights. Multi-class: P softmax problems of ``n_classes`` = K columns each (problem p owns
    columns ``p K .. p K + K - 1``), ``Y`` ``(N, P K)`` one-hot targets, ``m`` ``(N, P)`` the rows
    of each problem (several problems on disjoint rows solve several draws at once, as
    few-shot does). :attr:`gram` caches the loss Hessian blocks between solves of a C path.
    """

    def __init__(self, Xa: Array, Y: Array, m: Array, n_classes: int | None = None) -> None:
        self.Xa = Xa
        self.multiclass = n_classes is not None
        self.k = 1 if n_classes is None else n_classes
        self.m = m
        self.Y = Y * (np.repeat(m, self.k, axis=1) if self.multiclass else m)
        self.n_valid = m.sum(0)
        self.n_problems = int(self.n_valid.size)
        self.problem_of_col = np.repeat(np.arange(self.n_problems), self.k)
        self.n_col = np.maximum(self.n_valid[self.problem_of_col], 1.0)
        #: Per problem, the span of rows holding all its valid ones (stacked draws: its own).
        self.rows = [slice(int(nz[0]), int(nz[-1]) + 1) if nz.size else slice(0, 0)
                     for nz in (np.flatnonzero(c) for c in m.T)]  # fmt: skip
        #: Loss Hessian blocks ``(Q, D + 1, D + 1)`` at the last refresh, reused along the path.
        self.gram: Array | None = None

    @classmethod
    def from_targets(cls, X: Array, targets: Targets, n_out: int) -> DenseLogistic:
        """One probe's problems: standardised rows ``X`` ``(N, D)`` and its :class:`Targets`."""
        m = targets.mask.astype(np.float64)
        if targets.task != "multiclass":
            return cls(with_ones(X), np.asarray(targets.y, dtype=np.float64), m)
        Y = np.zeros((X.shape[0], n_out))
        Y[np.arange(X.shape[0]), targets.y] = 1.0
        return cls(with_ones(X), Y, m[:, None], n_out)

    def psum(self, per_col: Array) -> Array:
        """(Q,) -> (P,) by problem."""
        return per_col.reshape(-1, self.k).sum(1) if self.multiclass else per_col

    def pmax(self, per_col: Array) -> Array:
        """(Q,) -> (P,) by problem, the largest."""
        return per_col.reshape(-1, self.k).max(1) if self.multiclass else per_col

    def _grouped(self, A: Array) -> Array:
        """``(R, P K)`` -> ``(R, P, K)`` view: the classes of each softmax problem."""
        return A.reshape(A.shape[0], -1, self.k)

    def value_grad(self, W: Array, lam: Array) -> tuple[Array, Array, Array]:
        """(objective (P,), gradient ``(D + 1, Q)``, curvature state ``(N, Q)``) at ``W``;
        ``lam`` = 1 / (C n) per column. The state is what :meth:`hvp` and :meth:`curvature_gram`
        need: masked softmax probabilities, or masked sigmoid curvatures."""
        Z = self.Xa @ W
        w = W[:-1]
        if self.multiclass:
            Z3 = self._grouped(Z)
            zmax = Z3.max(2, keepdims=True)
            E = np.exp(Z3 - zmax)
            s = E.sum(2, keepdims=True)
            lse = (np.log(s) + zmax)[:, :, 0]
            loss = (lse * self.m).sum(0) - self.psum((Z * self.Y).sum(0))
            S = (E * (self.m[:, :, None] / s)).reshape(Z.shape)
            R = S - self.Y
        else:
            P = expit(Z)
            loss = ((np.logaddexp(0.0, Z) - self.Y * Z) * self.m).sum(0)
            R = (P - self.Y) * self.m
            S = P * (1.0 - P) * self.m
        G = self.Xa.T @ R
        G /= self.n_col
        G[:-1] += w * lam
        f = loss / np.maximum(self.n_valid, 1.0) + self.psum(0.5 * lam * (w * w).sum(0))
        return f, G, S

    def hvp(self, V: Array, S: Array, lam: Array) -> Array:
        """Hessian times ``V`` ``(D + 1, Q)`` at the point whose state is ``S``."""
        R = S * (self.Xa @ V)
        if self.multiclass:  # (diag(p) - p p^T) z per row and problem, p already masked
            R3 = self._grouped(R)
            R3 -= self._grouped(S) * R3.sum(2, keepdims=True)
        out = self.Xa.T @ R
        out /= self.n_col
        out[:-1] += V[:-1] * lam
        return out

    def curvature_gram(self, S: Array) -> Array:
        """``Xa^T diag(s_q) Xa`` per column ``(Q, D + 1, D + 1)``: the loss Hessian of a label, the
        block-Jacobi part of the softmax (``s = p (1 - p)``)."""
        r = np.sqrt(S * (1.0 - S) if self.multiclass else S)
        out = np.empty((S.shape[1], self.Xa.shape[1], self.Xa.shape[1]))
        for q in range(S.shape[1]):
            rows = self.rows[self.problem_of_col[q]]
            B = self.Xa[rows] * r[rows, q : q + 1]
            out[q] = B.T @ B  # numpy's matmul runs B^T B as one symmetric rank-k update
        return out

    def inverse_blocks(self, lam: Array) -> Array:
        """Inverses of the Hessian blocks ``gram / n + lam I`` (intercept unpenalised)."""
        assert self.gram is not None
        H = self.gram / self.n_col[:, None, None]
        d = H.shape[1] - 1
        idx = np.arange(d)
        H[:, idx, idx] += lam[:, None]
        H[:, d, d] += np.finfo(np.float64).eps  # an all-masked column stays invertible
        low = np.empty_like(H)
        for q in range(H.shape[0]):  # Cholesky + its inverse: ~4x faster than np.linalg.inv
            c, info = lapack.dpotrf(H[q], lower=True)  # clean=1: zeros above the diagonal
            if info == 0:
                c, info = lapack.dpotri(c, lower=True)  # the lower triangle of the inverse
            # Not numerically positive definite: the pseudo-inverse preconditions instead.
            low[q] = c if info == 0 else np.tril(np.linalg.pinv(H[q], hermitian=True))
        inv: Array = low + low.transpose(0, 2, 1)
        inv[:, idx, idx] *= 0.5
        inv[:, d, d] *= 0.5
        return inv

    def preconditioner(self, inv: Array, lam: Array) -> Any:
        """``R -> M^-1 R`` with the block inverses (softmax: the shift-invariant subspace treated
        exactly, as in :func:`embedkit.probes.newton._preconditioner`)."""

        def base(R: Array) -> Array:
            out: Array = np.matmul(inv, R.T[:, :, None])[:, :, 0].T
            return out

        if not self.multiclass:
            return base
        lam_p = lam[:: self.k][None, :, None]

        def softmax(R: Array) -> Array:
            common = self._grouped(R).mean(2, keepdims=True)
            Z = base((self._grouped(R) - common).reshape(R.shape))
            Z3 = self._grouped(Z)
            Z3 -= Z3.mean(2, keepdims=True)
            Z3[:-1] += common[:-1] / lam_p
            return Z

        return softmax


def _pcg(
    prob: DenseLogistic, g: Array, S: Array, lam: Array, precond: Any, active: NDArray[np.bool_]
) -> tuple[Array, int]:
    """(Newton direction, CG steps): per problem to the relative residual ``min(0.5, sqrt|g|)``;
    a problem without positive curvature on its first step takes ``M^-1 (-g)``."""
    pcol = prob.problem_of_col
    tiny = np.finfo(np.float64).tiny
    gnorm = np.sqrt(prob.psum((g * g).sum(0)))
    target = np.minimum(np.sqrt(gnorm), 0.5) * gnorm
    d = np.zeros_like(g)
    r = -g
    z0 = precond(r)
    p = z0
    rz = prob.psum((r * z0).sum(0))
    cg = active.copy()
    steps = 0
    while steps < min(MAX_CG, g.size):
        steps += 1
        Hp = prob.hvp(p, S, lam)
        pHp = prob.psum((p * Hp).sum(0))
        cg &= pHp > 0
        alpha = np.where(cg, rz / np.where(cg, pHp, 1.0), 0.0)[pcol]
        d += alpha * p
        r -= alpha * Hp
        cg &= np.sqrt(prob.psum((r * r).sum(0))) > target
        if not cg.any():
            break
        z = precond(r)
        rz_new = prob.psum((r * z).sum(0))
        beta = np.where(cg, rz_new / np.where(rz > tiny, rz, 1.0), 0.0)
        p = z + beta[pcol] * p
        rz = rz_new
    empty = active & (prob.psum(np.abs(d).max(0)) == 0)
    if empty.any():
        d[:, empty[pcol]] = z0[:, empty[pcol]]
    return d, steps


def dense_newton(
    prob: DenseLogistic, W: Array, C: Array, *, max_iter: int, tol: float
) -> tuple[Array, SolveInfo]:
    """Minimise every problem of ``prob`` from ``W`` ``(D + 1, Q)`` (warm start) at the C of each
    problem ``C`` (P,); returns the new W and the status (``n_iter``: Newton iterations)."""
    pcol = prob.problem_of_col
    lam = 1.0 / (np.asarray(C, dtype=np.float64)[pcol] * prob.n_col)
    ftol = 64.0 * np.finfo(np.float64).eps
    W = np.array(W, dtype=np.float64)
    state = Convergence(prob.n_valid > 0)
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        f, G, S = prob.value_grad(W, lam)
        inv: Array | None = None
        cg_steps = 0
        for _ in range(max_iter):
            if state.gradient_small(prob.pmax(np.abs(G).max(0)), tol):
                break
            active = state.active
            if prob.gram is None or cg_steps > REFRESH_CG_STEPS:
                prob.gram = prob.curvature_gram(S)
                inv = None
            if inv is None:
                inv = prob.inverse_blocks(lam)
            d, cg_steps = _pcg(prob, G, S, lam, prob.preconditioner(inv, lam), active)
            d[:, ~active[pcol]] = 0.0
            gd = prob.psum((G * d).sum(0))
            t = np.ones(prob.n_problems)
            pending = active.copy()
            W_new, f_new, G_new, S_new = W, f.copy(), G, S
            for _ls in range(MAX_HALVINGS):
                W_try = W + t[pcol] * d
                f_try, G_try, S_try = prob.value_grad(W_try, lam)
                ok = pending & np.isfinite(f_try) & (f_try <= f + 1e-4 * t * gd)
                if W_new is W and not (pending & ~ok).any():  # all accept the full step
                    W_new, f_new, G_new, S_new = W_try, f_try, G_try, S_try
                    pending[:] = False
                    break
                if W_new is W:
                    W_new, G_new, S_new = W.copy(), G.copy(), S.copy()
                okc = ok[pcol]
                W_new[:, okc] = W_try[:, okc]
                G_new[:, okc] = G_try[:, okc]
                S_new[:, okc] = S_try[:, okc]
                f_new[ok] = f_try[ok]
                pending &= ~ok
                if not pending.any():
                    break
                t[pending] *= 0.5
            state.after_step(f, f_new, pending, ftol)
            W, f, G, S = W_new, f_new, G_new, S_new
    return W, state.info()
