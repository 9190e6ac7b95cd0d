"""L2 logistic-regression probe over a C path (DINOv2 ``log_regression``), on torch.

:class:`LogisticProbe` follows DINOv2's protocol (its ``log_regression`` evaluation): L2 penalty,
``C = 10 ** linspace(-6, 5, 45)``, max_iter 1000, tol 1e-12 (here ``tol=1e-12``; the default
:data:`DEFAULT_TOL` gives the same chosen C and test AUROC, measured), float64; C chosen on a
validation split (10% of train, seed 0, when none is given); the final model is refit on
train + validation. Per label the objective is scikit-learn's ``LogisticRegression(C=C)``
(:mod:`embedkit.probes.objective`); multi-label = independent sigmoids (one-vs-rest, DINOv3's
scikit-learn setup) with masks, multi-class = softmax (multinomial).

All labels are solved together: up to :data:`NEWTON_MAX_FEATURES` features by a batched
Newton-CG with the exact Hessian blocks (:mod:`embedkit.probes.newton`), above by a batched,
preconditioned L-BFGS (:mod:`embedkit.probes.lbfgs`, :mod:`embedkit.probes.precondition`);
small problems run on one CPU thread (``n_threads``), and up to
:data:`~embedkit.probes.dense.DENSE_MAX_VALUES` standardised values (float64, CPU) the same
Newton-CG runs in numpy (:mod:`embedkit.probes.dense`), where a small call costs far less.
The C grid is swept as a warm-started path from strong to weak regularisation. Features stay in
their stored dtype (float16 by default): every pass converts one row block at a time to the
compute dtype and standardisation is folded into the weights, so peak memory is the features
plus a few blocks.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from numpy.typing import ArrayLike, NDArray

from embedkit.probes.backends import (
    DEFAULT_BLOCK_CACHE_BYTES,
    ProbeInputError,
    RowBlocks,
    Source,
    check_features,
    column_stats,
    compute_threads,
    safe_scale,
    stat_tensors,
    torch_dtype,
)
from embedkit.probes.dense import DENSE_MAX_VALUES, blas_threads, dense_newton
from embedkit.probes.external import check_backend, fit_logistic
from embedkit.probes.fitted import LinearPredictor, best_index, logits, val_scores
from embedkit.probes.lbfgs import SolveInfo, lbfgs
from embedkit.probes.newton import newton_cg
from embedkit.probes.objective import LogisticObjective
from embedkit.probes.policies import DEFAULT_TOL
from embedkit.probes.precondition import Spectrum
from embedkit.probes.targets import (
    Targets,
    Task,
    check_targets,
    holdout_split,
    make_targets,
    output_classes,
    resolve_task,
)
from embedkit.progress import ProgressFactory, no_progress

__all__ = ["DEFAULT_TOL", "DINOV2_CS", "LogisticProbe", "PathResult"]

logger = logging.getLogger(__name__)

#: DINOv2 ``log_regression``: C = 10 ** linspace(-6, 5, 45).
DINOV2_CS: NDArray[np.float64] = np.logspace(-6, 5, 45)
#: ``solver="auto"``: Newton-CG up to this many features, preconditioned L-BFGS above
#: (measured, benchmarks/RESULTS.md "Probe solvers": at 768 features L-BFGS needs fewer passes
#: over the rows than spectrum-preconditioned Newton-CG at the default tol).
NEWTON_MAX_FEATURES = 256
#: Newton-CG preconditioned by the exact per-column Hessian blocks up to this many features
#: (by the features' spectrum above, with ``solver="newton"``).
EXACT_BLOCKS_MAX_FEATURES = 256


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


class LogisticProbe(LinearPredictor):
    """L2 logistic regression probe with DINOv2's C grid, solved as one batched torch problem.

    Parameters follow DINOv2 ``log_regression``: ``Cs`` = 10 ** linspace(-6, 5, 45),
    ``max_iter`` 1000 (per C), ``tol`` 1e-12 (default :data:`DEFAULT_TOL`, see above), float64,
    validation split 10% / seed 0 when ``fit`` gets no validation data, refit on train + val.

    - ``Cs``: the C grid searched when ``C`` is None (None: DINOv2's grid, :data:`DINOV2_CS`).
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
    - ``device`` / ``dtype``: where and in which precision the solver runs (``"cuda"`` for GPUs);
      the features keep their own dtype and are converted one row block at a time.
    - ``precondition`` (L-BFGS only): ``"auto"`` / True (default) preconditions L-BFGS with the
      spectrum of the standardised features (exact up to 2,048 features, rank 1,024 randomized
      above; see :mod:`embedkit.probes.precondition`); False runs plain L-BFGS. Same optimum.
    - ``tol``: stop when the gradient max-norm of the scaled objective is at most ``tol`` (or
      the objective no longer decreases in floating point). ``1e-12`` is DINOv2's strict setting.
    - ``solver``: ``"auto"`` (Newton-CG up to :data:`NEWTON_MAX_FEATURES` features, L-BFGS
      above), ``"newton"`` or ``"lbfgs"``: same optimum, different speed.
    - ``n_threads``: torch CPU threads while fitting (None: one for small problems, see
      :func:`~embedkit.probes.backends.compute_threads`, torch's setting otherwise).
    - ``backend``: ``"torch"`` (embedkit's solvers), ``"sklearn"`` (scikit-learn's
      ``LogisticRegression`` per label and C: the CPU reference) or ``"cuml"`` (RAPIDS cuML on a
      GPU, as DINOv2's reference evaluation); same protocol and objective, see
      :mod:`embedkit.probes.external`. ``solver`` and ``precondition`` apply to ``"torch"``.
    - ``max_resident_bytes``: converted row blocks are cached between passes when their total
      fits (default 256 MiB: small problems only); larger inputs are re-converted per pass, so
      peak memory stays near the size of the stored features.
    - ``progress``: a factory ``(total, description) -> context yielding advance(n)``
      (:mod:`embedkit.progress`); the C path advances it once per C. None: no bar.

    Fitted attributes: ``C_`` (float; ``(L,)`` under per-label selection), ``coef_`` ``(D, L)``,
    ``intercept_``, ``mean_`` / ``scale_``, ``path_`` (:class:`PathResult`, after selection),
    ``n_iter_`` / ``converged_`` per problem, ``classes_`` (multi-class).
    """

    C_: float | NDArray[np.float64]

    def __init__(
        self,
        Cs: ArrayLike | None = None,
        C: float | None = None,
        *,
        standardize: bool = True,
        max_iter: int = 1000,
        tol: float = DEFAULT_TOL,
        device: str = "cpu",
        dtype: torch.dtype | str = "float64",
        task: Task = "auto",
        select: Literal["joint", "per_label"] = "joint",
        metric: Literal["auto", "auroc", "accuracy", "log_loss"] = "auto",
        val_fraction: float = 0.1,
        seed: int = 0,
        history: int = 10,
        max_resident_bytes: int = DEFAULT_BLOCK_CACHE_BYTES,
        precondition: bool | Literal["auto"] = "auto",
        solver: Literal["auto", "newton", "lbfgs"] = "auto",
        n_threads: int | None = None,
        backend: Literal["torch", "sklearn", "cuml"] = "torch",
        progress: ProgressFactory | None = None,
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
        self.solver = solver
        self.n_threads = n_threads
        self.backend = backend
        self.progress = progress

    # ---- helpers
    def _sorted_cs(self) -> NDArray[np.float64]:
        grid = DINOV2_CS if self.Cs is None else self.Cs
        cs = np.sort(np.asarray(grid, dtype=np.float64).ravel())
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
        targets: Targets,
        n_out: int,
        mean: NDArray[np.float64] | None,
        scale: NDArray[np.float64] | None,
        spectrum: Spectrum | None = None,
    ) -> LogisticObjective:
        dt, dev = torch_dtype(self.dtype), torch.device(self.device)
        budget = self.max_resident_bytes
        blocks = RowBlocks(sources, dtype=dt, device=dev, max_resident_bytes=budget)
        mean_t, inv_t = stat_tensors(mean, scale, dt, dev)
        return LogisticObjective(blocks, targets, n_out, mean_t, inv_t, spectrum)

    def _setup(
        self, y: ArrayLike, mask: ArrayLike | None
    ) -> tuple[Literal["multilabel", "multiclass"], NDArray[Any] | None, int]:
        """(task, multi-class classes or None, number of outputs) of the training targets."""
        y_arr = np.asarray(y)
        task = resolve_task(self.task, y_arr)
        return (task, *output_classes(task, y_arr, mask))

    def _check_labels(self, targets: Targets) -> None:
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

    def _dense(self, obj: LogisticObjective) -> bool:
        """Whether this problem takes the numpy path (:mod:`embedkit.probes.dense`): small, on
        the CPU, in float64, by Newton."""
        d = obj.blocks.n_features
        return (
            self.solver in ("auto", "newton")
            and obj.blocks.device.type == "cpu"
            and obj.blocks.dtype == torch.float64
            and d <= EXACT_BLOCKS_MAX_FEATURES
            and obj.blocks.n_rows * (d + 1) <= DENSE_MAX_VALUES
        )

    def _solve(
        self, obj: LogisticObjective, W0: torch.Tensor, C: NDArray[np.float64]
    ) -> tuple[torch.Tensor, SolveInfo]:
        C_t = torch.as_tensor(C, dtype=W0.dtype, device=W0.device)
        if self.precondition not in (True, False, "auto"):
            raise ProbeInputError(
                f"Invalid precondition {self.precondition!r}, choose one of [True, False, 'auto']."
            )
        if check_backend(self.backend) != "torch":
            W, n_iter, conv = fit_logistic(
                self.backend,
                obj.standardised_rows(),
                obj.targets,
                obj.n_cols,
                C,
                tol=self.tol,
                max_iter=self.max_iter,
            )
            W_t = torch.as_tensor(W, dtype=W0.dtype, device=W0.device)
            return W_t, SolveInfo(n_iter, conv)
        if self.solver not in ("auto", "newton", "lbfgs"):
            raise ProbeInputError(
                f"Invalid solver {self.solver!r}, choose one of ['auto', 'newton', 'lbfgs']."
            )
        if self._dense(obj):
            with blas_threads(self.n_threads or 1):
                W_np, info = dense_newton(
                    obj.small(), W0.cpu().numpy(), C, max_iter=self.max_iter, tol=self.tol
                )
            return torch.from_numpy(W_np), info
        if self.solver == "newton" or (
            self.solver == "auto" and obj.blocks.n_features <= NEWTON_MAX_FEATURES
        ):
            exact = obj.blocks.n_features <= EXACT_BLOCKS_MAX_FEATURES
            return newton_cg(obj, W0, C_t, max_iter=self.max_iter, tol=self.tol, exact_blocks=exact)
        return lbfgs(
            obj,
            W0,
            C_t,
            max_iter=self.max_iter,
            tol=self.tol,
            history=self.history,
            precondition=bool(self.precondition),
        )

    def _store(
        self,
        W: torch.Tensor,
        info: SolveInfo,
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
        *,
        mask: ArrayLike | None = None,
        groups: ArrayLike | None = None,
    ) -> LogisticProbe:
        """Fit at ``C`` if set; otherwise choose C on a held-out ``val_fraction`` of the rows
        (whole ``groups`` per side when given; DINOv2: 10%, seed 0) and refit on all rows."""
        arr = check_features(X)
        with compute_threads(self.n_threads, arr.size):
            return self._fit(arr, y, mask, groups)

    def _fit(
        self, arr: NDArray[Any], y: ArrayLike, mask: ArrayLike | None, groups: ArrayLike | None
    ) -> LogisticProbe:
        y = check_targets(y, arr.shape[0], "LogisticProbe")
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
        task, classes, n_out = self._setup(y, mask)
        targets = make_targets(y, mask, task, arr.shape[0], classes)
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
        train, val = check_features(X_train), check_features(X_val, "X_val")
        with compute_threads(self.n_threads, train.size + val.size):
            return self._path([Source(train)], y_train, mask_train, [Source(val)], y_val, mask_val)[
                0
            ]

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
        task, classes, n_out = self._setup(y_train, mask_train)
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
        t_tr = make_targets(y_train, mask_train, task, n_tr, classes)
        t_va = make_targets(y_val, mask_val, task, n_va, classes)
        self._check_labels(t_tr)
        mean, scale = self._stats(train)
        obj = self._objective(train, t_tr, n_out, mean, scale)
        val_blocks = RowBlocks(
            val,
            dtype=obj.blocks.dtype,
            device=obj.blocks.device,
            max_resident_bytes=self.max_resident_bytes,
        )
        cs = self._sorted_cs()
        W = torch.zeros((obj.blocks.n_features + 1, n_out), dtype=obj.blocks.dtype)
        W = W.to(obj.blocks.device)
        Ws, per, joint, iters, conv = [], [], [], [], []
        with (self.progress or no_progress)(cs.size, "linear probe: C path") as advance:
            for c in cs:
                W, info = self._solve(obj, W, np.full(obj.n_problems, c))
                Ws.append(W)
                z = logits(val_blocks, W, obj.mean, obj.inv_scale)
                p, j = val_scores(task, metric, t_va, z)
                per.append(p)
                joint.append(j)
                iters.append(info.n_iter)
                conv.append(info.converged)
                advance(1)
        scores = np.array(per)
        score = np.array(joint)
        lower = metric == "log_loss"
        best_joint = best_index(score, lower)
        if best_joint < 0:
            raise ProbeInputError(
                f"The validation {metric} is undefined at every C (no label has both classes among "
                "its valid validation entries); use a larger validation split."
            )
        best = np.full(obj.n_problems, best_joint, dtype=np.int64)
        if self.select == "per_label":
            for j in range(obj.n_problems):
                b = best_index(scores[:, j], lower)
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
        extra = {
            "task": task,
            "classes": classes,
            "n_out": n_out,
            "mean": mean,
            "scale": scale,
            "spectrum": obj.spectrum_if_estimated,
        }
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
        train, val = check_features(X_train), check_features(X_val, "X_val")
        with compute_threads(self.n_threads, train.size + val.size):
            return self._fit_select_sources(
                [Source(train)], y_train, mask_train, [Source(val)], y_val, mask_val
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
        targets = make_targets(y_all, m_all, task, n_all, classes)
        mean, scale = self._stats(both)
        # The train-only spectrum preconditions the refit too (only convergence speed depends
        # on it, and train + val have nearly the same second moments).
        obj = self._objective(both, targets, n_out, mean, scale, extra["spectrum"])
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
