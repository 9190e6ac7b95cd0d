"""Batched L-BFGS: many independent smooth problems minimised together, on torch.

All problems share one ``(D + 1, Q)`` weight matrix and one matmul per pass over the data, but
every problem keeps its own curvature history, step size (Armijo backtracking) and stopping test
(gradient max-norm <= tol, or relative decrease <= ftol = 64 * machine epsilon, scikit-learn /
scipy's L-BFGS-B values); converged problems drop out of the matmuls. With ``precondition``
the initial inverse Hessian is ``gamma M^-1`` (see :mod:`embedkit.probes.precondition`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray

from embedkit.probes.objective import LogisticObjective

__all__ = ["Convergence", "SolveInfo", "lbfgs"]

logger = logging.getLogger(__name__)


@dataclass
class SolveInfo:
    n_iter: NDArray[np.int64]
    converged: NDArray[np.bool_]


def _host(a: Any) -> Any:
    return a.cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)


class Convergence:
    """Per-problem stopping bookkeeping of the batched solvers (torch tensors or numpy arrays).

    A problem stops when its gradient max-norm is at most ``tol`` (:meth:`gradient_small`), or
    after an iteration whose relative decrease was at most ``ftol`` or whose line search found
    no decrease (:meth:`after_step`; both at the limit of floating-point precision). ``active``
    flags the problems still iterating, ``n_iter`` counts their iterations.
    """

    def __init__(self, active: Any) -> None:
        self.active: Any = active.clone() if isinstance(active, torch.Tensor) else active.copy()
        self.converged = ~self.active
        self.n_iter = self.active * 0

    def gradient_small(self, gmax: Any, tol: float) -> bool:
        """Retire the problems with ``gmax <= tol``; True when no problem is left active."""
        done = self.active & (gmax <= tol)
        self.converged |= done
        self.active &= ~done
        return not bool(self.active.any())

    def after_step(self, f: Any, f_new: Any, stalled: Any, ftol: float) -> None:
        """Count the iteration and retire the problems that no longer decrease."""
        scale = abs(f)
        scale = scale + (abs(f_new) - scale).clip(min=0.0)
        rel = (f - f_new) / (scale + (1.0 - scale).clip(min=0.0))  # over max(|f|, |f_new|, 1)
        small = self.active & ~stalled & (rel <= ftol)
        self.n_iter += self.active
        if bool(stalled.any()):
            logger.debug("line search stalled for problems %s", _host(stalled).nonzero()[0])
        self.converged |= small | stalled
        self.active &= ~(small | stalled)

    def info(self) -> SolveInfo:
        return SolveInfo(_host(self.n_iter).astype(np.int64), _host(self.converged))


def lbfgs(
    obj: LogisticObjective,
    W: torch.Tensor,
    C: torch.Tensor,
    *,
    max_iter: int,
    tol: float,
    history: int = 10,
    precondition: bool = True,
) -> tuple[torch.Tensor, SolveInfo]:
    """Minimise every problem of ``obj`` from ``W`` (warm start); returns the new W and status."""
    dev, dt = W.device, W.dtype
    ftol = 64.0 * torch.finfo(dt).eps
    P = obj.n_problems
    W = W.clone()
    state = Convergence(obj.n_valid > 0)
    active = state.active
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
        if state.gradient_small(obj.reduce(G.abs().amax(0), op="max"), tol):
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
        state.after_step(f, f_new, stalled, ftol)
        W, f, G, curv = W_new, f_new, G_new, curv_new
    return W, state.info()
