"""SGD linear heads: the DINOv2 / DINOv3 linear-evaluation grid, trained in one pass.

Learning rates {1e-5 ... 0.1} scaled by batch / 256, SGD with momentum 0.9, no weight decay,
cosine schedule, all heads trained together on the same mini-batches, the head chosen on
validation (the DINOv2 / DINOv3 linear-evaluation code).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from numpy.typing import ArrayLike, NDArray

from embedkit.probes.backends import (
    ProbeInputError,
    RowBlocks,
    Source,
    check_features,
    column_stats,
    safe_scale,
    stat_tensors,
    torch_dtype,
)
from embedkit.probes.fitted import LinearPredictor, best_index, val_scores
from embedkit.probes.targets import (
    Task,
    check_targets,
    holdout_split,
    make_targets,
    output_classes,
    resolve_task,
)

__all__ = ["DINO_LR_GRID", "SGDLinearProbe"]

#: DINOv2 / DINOv3 linear eval learning-rate grid (before scaling by batch / 256).
DINO_LR_GRID: tuple[float, ...] = (
    1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 0.1,
)  # fmt: skip


class SGDLinearProbe(LinearPredictor):
    """The DINOv2 / DINOv3 linear-evaluation head grid, trained in one pass over the features.

    One linear head per learning rate in ``lrs`` (DINOv2 / DINOv3 grid {1e-5, ..., 0.1}), each
    scaled by ``batch_size / 256``; SGD with momentum 0.9, no weight decay, cosine schedule to 0
    over ``epochs``, heads initialised N(0, 0.01) with zero bias (DINOv2 ``LinearClassifier``).
    All heads see the same mini-batches (a batched ``(H, D, L)`` weight) and the head with the best
    validation metric (macro AUROC multi-label, accuracy multi-class; ties to the smaller lr) is
    kept; there is no refit. Loss: masked BCE-with-logits averaged over valid entries
    (multi-label), cross-entropy over valid rows (multi-class). ``standardize`` is off by default,
    as in the reference code. Fitted: ``lr_`` (grid value), ``lr_scaled_``, ``val_scores_``
    (``{lr: joint validation metric}``), ``val_metric_``, ``val_per_label_``.
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
        dtype: torch.dtype | str = "float32",
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
        *,
        mask: ArrayLike | None = None,
        groups: ArrayLike | None = None,
    ) -> SGDLinearProbe:
        """Hold out ``val_fraction`` of the rows (by ``groups`` if given), then fit_select."""
        arr = check_features(X)
        y_arr = check_targets(y, arr.shape[0], "SGDLinearProbe")
        tr, va = holdout_split(arr.shape[0], self.val_fraction, self.seed, groups)
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
        y_train = check_targets(y_train, xt.shape[0], "SGDLinearProbe")
        y_val = check_targets(y_val, xv.shape[0], "SGDLinearProbe")
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
        task = resolve_task(self.task, y_tr)
        classes, n_out = output_classes(task, y_tr, mask_train)
        metric = "auroc" if self.metric == "auto" and task == "multilabel" else self.metric
        metric = "accuracy" if metric == "auto" else metric
        t_tr = make_targets(y_train, mask_train, task, rows_tr.size, classes)
        t_va = make_targets(y_val, mask_val, task, rows_va.size, classes)
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
        blocks_tr = RowBlocks([src_tr], dtype=dt, device=dev)
        mean_t, inv_t = stat_tensors(mean, scale, dt, dev)
        n = rows_tr.size
        steps_per_epoch = math.ceil(n / self.batch_size)
        total = steps_per_epoch * self.epochs
        rng = np.random.default_rng(self.seed)
        step = 0
        for _ in range(self.epochs):
            perm = rng.permutation(n)
            for lo in range(0, n, self.batch_size):
                idx = np.sort(perm[lo : lo + self.batch_size])
                Xb = blocks_tr.convert(src_tr.read_rows(idx))
                Wr = W.detach().requires_grad_(True)
                w_raw, b_raw = Wr[:, :-1], Wr[:, -1:, :]  # standardisation folded into them
                if inv_t is not None:
                    w_raw = w_raw * inv_t[:, None]
                if mean_t is not None:
                    b_raw = b_raw - torch.einsum("d,hdq->hq", mean_t, w_raw)[:, None, :]
                Z = torch.matmul(Xb, w_raw) + b_raw  # (H, B, Q)
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
        blocks_va = RowBlocks([Source(X_va, rows_va)], dtype=dt, device=dev, max_resident_bytes=0)
        scores, joint = [], []
        for h in range(H):
            p, j = val_scores(task, metric, t_va, self._logits(blocks_va, W[h]))
            scores.append(p)
            joint.append(j)
        best = best_index(np.array(joint), metric == "log_loss")
        if best < 0:
            raise ProbeInputError(f"The validation {metric} is undefined for every head.")
        self._W = W[best].clone()
        self.task_ = task
        if classes is not None:
            self.classes_ = classes
        self.val_metric_ = metric
        self.lr_ = float(self.lrs[best])
        self.lr_scaled_ = float(lrs[best])
        self.val_scores_ = dict(zip([float(v) for v in self.lrs], joint, strict=True))
        self.val_per_label_ = np.array(scores)
        self.n_features_in_ = D
        return self
