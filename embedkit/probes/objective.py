"""The scaled L2-logistic objective of many independent problems, over streamed row blocks.

Per label the objective is scikit-learn's ``LogisticRegression(C=C)``::

    C * sum_i loss_i + 0.5 * ||w||^2          (intercept not penalised)

evaluated in the equivalent scaled form ``mean_i loss_i + ||w||^2 / (2 C n)``. Multi-label =
independent sigmoids (problem l owns column l of the weights), masked entries contribute nothing
to a label's loss nor to its ``n``; multi-class = one softmax problem owning all K columns.

The weights live in standardised space (``(x - mean) / scale``) but the features are never
standardised: each pass folds the statistics into the weights (``x @ (w / scale) + b'``) and
unfolds the gradient (``(X^T R - mean sum R) / scale``), so the row blocks are the stored
features converted to the compute dtype and nothing else.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from numpy.typing import NDArray

from embedkit.probes.backends import RowBlocks, fold_standardization
from embedkit.probes.precondition import Spectrum, apply_inverse, estimate_spectrum
from embedkit.probes.targets import Targets

if TYPE_CHECKING:
    from embedkit.probes.dense import DenseLogistic

__all__ = ["LogisticObjective"]


class LogisticObjective:
    """Scaled L2-logistic objective of P independent problems over columns of W ``(D + 1, Q)``.

    Multi-label: P = Q = L (problem l owns column l). Multi-class: P = 1 owning all K columns.
    ``mean`` / ``inv_scale`` ``(D,)`` (compute dtype) define the standardised space of W;
    ``spectrum`` (for the preconditioner) is estimated on first use unless given.
    """

    def __init__(
        self,
        blocks: RowBlocks,
        targets: Targets,
        n_out: int,
        mean: torch.Tensor | None = None,
        inv_scale: torch.Tensor | None = None,
        spectrum: Spectrum | None = None,
    ) -> None:
        self.blocks = blocks
        self.mean = mean
        self.inv_scale = inv_scale
        self.targets = targets
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
        self.n_valid = self.m.sum(0) if not self.multiclass else self.m.sum().reshape(1)
        # Mean logistic curvature sigma(z)(1 - sigma(z)) per column at the last evaluated point.
        self.curv = torch.full((n_out,), 0.25, dtype=dt, device=dev)
        self.last_curv = self.curv
        self._spectrum = spectrum
        self.last_state: torch.Tensor | None = None
        #: (columns, :meth:`curvature_gram`) last computed: reused along the C path.
        self.gram_cache: tuple[torch.Tensor, torch.Tensor] | None = None
        #: The standardised rows as one numpy array, for an external backend (built once).
        self.dense: NDArray[np.float64] | None = None
        self._small: DenseLogistic | None = None

    def small(self) -> DenseLogistic:
        """The same objective in numpy float64 on the standardised rows held in memory (built
        once; its Hessian blocks are then reused along the C path)."""
        if self._small is None:
            from embedkit.probes.dense import DenseLogistic

            self._small = DenseLogistic.from_targets(
                self.standardised_rows(), self.targets, self.n_cols
            )
        return self._small

    @property
    def spectrum_if_estimated(self) -> Spectrum | None:
        """The spectrum if the preconditioner has needed it so far, else None."""
        return self._spectrum

    @property
    def spectrum(self) -> Spectrum:
        """Eigenpairs of the standardised features' second-moment matrix (estimated once)."""
        if self._spectrum is None:
            self._spectrum = estimate_spectrum(self.blocks, self.mean, self.inv_scale)
        return self._spectrum

    def standardised_rows(self) -> NDArray[np.float64]:
        """All rows standardised, ``(N, D)`` float64 (materialised once, for external backends
        that take a whole matrix)."""
        if self.dense is None:
            out = np.empty((self.blocks.n_rows, self.blocks.n_features))
            for start, stop, Xb in self.blocks:
                Xs = Xb.double()
                if self.mean is not None:
                    Xs = Xs - self.mean.double()
                if self.inv_scale is not None:
                    Xs = Xs * self.inv_scale.double()
                out[start:stop] = Xs.cpu().numpy()
            self.dense = out
        return self.dense

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
        self, W: torch.Tensor, C: torch.Tensor, cols: torch.Tensor, *, keep_state: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Objective (P,) (zero for problems not in ``cols``) and gradient for columns ``cols``.

        ``W`` is ``(D + 1, len(cols))`` in standardised space, ``C`` the C of each problem (P,).
        With ``keep_state`` the per-row curvature state at ``W`` (sigmoid curvatures times mask
        for multi-label, masked softmax probabilities for multi-class; ``(N, len(cols))``) is
        kept in :attr:`last_state` for :meth:`hvp`.
        """
        w_raw, b_raw = fold_standardization(W, self.mean, self.inv_scale)
        loss = torch.zeros(W.shape[1], dtype=W.dtype, device=W.device)
        curv = torch.zeros(W.shape[1], dtype=W.dtype, device=W.device)
        G = torch.zeros_like(W)
        state = (
            torch.empty((self.blocks.n_rows, W.shape[1]), dtype=W.dtype, device=W.device)
            if keep_state
            else None
        )
        for start, stop, Xb in self.blocks:
            Z = torch.addmm(b_raw, Xb, w_raw)
            if self.multiclass:
                mb = self.m[start:stop]
                yb = self.y[start:stop]
                lse = torch.logsumexp(Z, dim=1)
                loss[0] += ((lse - Z.gather(1, yb[:, None])[:, 0]) * mb).sum()
                R = torch.softmax(Z, dim=1)
                curv += ((R * (1.0 - R)) * mb[:, None]).sum(0)
                if state is not None:
                    state[start:stop] = R * mb[:, None]
                R[torch.arange(R.shape[0], device=R.device), yb] -= 1.0
                R *= mb[:, None]
            else:
                mb = self.m[start:stop][:, cols]
                yb = self.y[start:stop][:, cols]
                bce = F.binary_cross_entropy_with_logits(Z, yb, reduction="none")
                loss += (bce * mb).sum(0)
                P = torch.sigmoid(Z)
                S = P * (1.0 - P) * mb
                curv += S.sum(0)
                if state is not None:
                    state[start:stop] = S
                R = (P - yb) * mb
            G[:-1].addmm_(Xb.T, R)
            G[-1] += R.sum(0)
        self._unfold(G)
        w = W[:-1]
        prob = self.problem_of_col[cols]
        n = self.n_valid[prob]
        c = C[prob]
        penalty = (w * w).sum(0) / (2.0 * c * n)
        G /= n
        G[:-1] += w / (c * n)
        f = torch.zeros(self.n_problems, dtype=W.dtype, device=W.device)
        f.index_add_(0, prob, loss / n + penalty)
        self.last_curv = curv / n
        self.last_state = state
        return f, G

    def _unfold(self, G: torch.Tensor) -> None:
        """``X^T R`` accumulated on the raw features -> gradient in standardised space, in place:
        d/dw of ((x - mean) * inv) @ w is (X^T R - mean sum R) * inv."""
        if self.mean is not None:
            G[:-1] -= self.mean[:, None] * G[-1][None, :]
        if self.inv_scale is not None:
            G[:-1] *= self.inv_scale[:, None]

    def hvp(
        self, V: torch.Tensor, state: torch.Tensor, C: torch.Tensor, cols: torch.Tensor
    ) -> torch.Tensor:
        """Hessian of the scaled objective times ``V`` ``(D + 1, len(cols))``, at the point whose
        :attr:`last_state` (restricted to ``cols``) is ``state``: one pass over the rows."""
        v_raw, b_raw = fold_standardization(V, self.mean, self.inv_scale)
        out = torch.zeros_like(V)
        for start, stop, Xb in self.blocks:
            Z = torch.addmm(b_raw, Xb, v_raw)
            Sb = state[start:stop]
            R = Sb * Z
            if self.multiclass:  # (diag(p) - p p^T) z per row, p already masked
                R -= Sb * R.sum(1, keepdim=True)
            out[:-1].addmm_(Xb.T, R)
            out[-1] += R.sum(0)
        self._unfold(out)
        prob = self.problem_of_col[cols]
        n = self.n_valid[prob]
        out /= n
        out[:-1] += V[:-1] / (C[prob] * n)
        return out

    def curvature_gram(self, state: torch.Tensor) -> torch.Tensor:
        """The per-column diagonal Hessian blocks of the summed loss, ``X~^T diag(s) X~``
        ``(q, D + 1, D + 1)`` (``X~`` the standardised rows with a column of ones; no penalty),
        at the point whose curvature state is ``state`` ``(N, q)``: the exact Hessian of a
        multi-label problem's loss, the block-Jacobi part of a softmax one. One pass over the
        rows costing ``N (D + 1)^2`` per column; :meth:`factor_blocks` adds the penalty."""
        q, D = state.shape[1], self.blocks.n_features
        A = torch.zeros((q, D + 1, D + 1), dtype=state.dtype, device=state.device)
        for start, stop, Xb in self.blocks:
            Xs = torch.empty((stop - start, D + 1), dtype=state.dtype, device=state.device)
            Xs[:, :-1] = Xb
            if self.mean is not None:
                Xs[:, :-1] -= self.mean
            if self.inv_scale is not None:
                Xs[:, :-1] *= self.inv_scale
            Xs[:, -1] = 1.0
            Sb = state[start:stop]
            if self.multiclass:
                Sb = Sb * (1.0 - Sb)  # masked p (1 - p): the softmax's diagonal blocks
            for j in range(q):
                A[j].addmm_(Xs.T, Xs * Sb[:, j : j + 1])
        return A

    def factor_blocks(self, A: torch.Tensor, C: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """Cholesky factors of ``A / n + I / (C n)`` (no penalty on the intercept) per column."""
        prob = self.problem_of_col[cols]
        n = self.n_valid[prob]
        H = A / n[:, None, None]
        D = A.shape[1] - 1
        idx = torch.arange(D, device=A.device)
        H[:, idx, idx] += (1.0 / (C[prob] * n))[:, None]
        H[:, D, D] += torch.finfo(A.dtype).eps  # an all-masked column stays factorisable
        factor: torch.Tensor = torch.linalg.cholesky(H)
        return factor

    def precondition(
        self, Q: torch.Tensor, C: torch.Tensor, curv: torch.Tensor, cols: torch.Tensor
    ) -> torch.Tensor:
        """Apply ``M^-1`` to ``Q`` ``(D + 1, len(cols))``, where per column
        ``M = a E[x x^T] + I / (C n)`` on the weights and ``a`` on the intercept, ``a`` the mean
        logistic curvature: a positive-definite approximation of the Hessian (exact up to the
        per-sample curvature spread), used as L-BFGS's initial inverse Hessian."""
        prob = self.problem_of_col[cols]
        lam = 1.0 / (C[prob] * self.n_valid[prob])
        return apply_inverse(self.spectrum, Q, curv, lam)
