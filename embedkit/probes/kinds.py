"""The registered probe kinds: ``linear``, ``knn``, ``sgd`` and ``fewshot``.

- ``linear``: L2 logistic regression over the DINOv2 C grid (:class:`LogisticProbe`), C chosen on
  the validation split (one C for all labels, by macro AUROC; accuracy for multi-class), refit
  on train + val;
- ``knn``: cosine kNN with the DINO weighted vote (:class:`KNNProbe`), k chosen on validation by
  macro AUROC from the request's ``ks``;
- ``sgd``: the DINOv2 / DINOv3 linear-evaluation SGD heads (:class:`SGDLinearProbe`: lr grid
  x batch / 256, momentum 0.9, cosine schedule, all heads in one pass), the head chosen on
  validation by the same rule as ``linear``, no refit;
- ``fewshot``: n = 1, 2, 4, 8, 16 training examples per class / label, ``draws`` draws each,
  sampled by patient from the train split only; mean, std and 95% CI over draws (a curve over
  shots).

Without a validation split, ``linear`` and ``sgd`` hold out 10% of train by patient (DINOv2).
``linear``, ``knn`` and ``sgd`` also return the chosen model's validation scores, from which the
runner picks the operating points (``linear``: the model refit on train + val, so these scores
are in-sample for the validation images; ``knn`` and ``sgd`` are fitted on train alone).
Each kind is one small class (:class:`embedkit.probes.registry.ProbeKind`) registered below.
Progress bars (the C path, kNN query blocks, few-shot draws) go to the factory the runner set
with :func:`embedkit.progress.progress_scope` (none outside a runner).
"""

from __future__ import annotations

import re
from collections.abc import Collection
from contextlib import nullcontext
from typing import TYPE_CHECKING, Any

import numpy as np

from embedkit.errors import EmbedkitError, FewShotSamplingError
from embedkit.eval import macro_auroc, ovr_macro_auroc
from embedkit.probes.policies import DEFAULT_TOL
from embedkit.probes.registry import KindResult, ProbeData, register
from embedkit.progress import current_progress

# The estimators (torch) load in fit_score/params, so registering the kinds stays cheap.
if TYPE_CHECKING:
    from embedkit.probes.features import SplitFeatures
    from embedkit.probes.linear import LogisticProbe
    from embedkit.probes.request import ProbeRequest
    from embedkit.probes.sgd import SGDLinearProbe

__all__ = ["FewShotKind", "KNNKind", "LinearKind", "SGDKind"]


def _stored_default(stored: Collection[str], suffix: str) -> str:
    """``cls`` + suffix when the entry stores a class token, else ``pooled`` + suffix."""
    return ("cls" if "cls" in stored else "pooled") + suffix


def _point(part: SplitFeatures, scores: np.ndarray) -> float:
    """The selection metric on validation: macro AUROC (one-vs-rest for multi-class)."""
    if part.y.ndim == 1:
        return float(ovr_macro_auroc(part.y, scores, part.mask))
    return float(macro_auroc(part.y, part.mask, scores))


def _val_scores(probe: LogisticProbe | SGDLinearProbe, val: SplitFeatures) -> np.ndarray | None:
    """The fitted probe's validation scores (for the operating points), None without a split."""
    return probe.predict_proba(val.X) if len(val.ids) else None


class LinearKind:
    name = "linear"
    curve: str | None = None

    def default_pooling(self, stored: Collection[str]) -> str:
        return _stored_default(stored, "+mean")

    def params(self, request: ProbeRequest) -> dict[str, Any]:
        return {
            "Cs": "10^linspace(-6, 5, 45)",
            "standardize": True,
            "select": "joint",
            "max_iter": request.max_iter,
            "tol": request.tol,
            "backend": request.backend,
        }

    def fit_score(self, request: ProbeRequest, data: ProbeData) -> KindResult:
        from embedkit.probes.linear import LogisticProbe

        train, val = data.train, data.val
        probe = LogisticProbe(
            seed=request.seed, max_iter=request.max_iter, tol=request.tol,
            backend=request.backend, progress=current_progress(),
        )  # fmt: skip
        if len(val.ids):
            probe.fit_select(train.X, train.y, train.mask, val.X, val.y, val.mask)
        else:  # no validation split: hold out 10% of train by patient (DINOv2 protocol)
            probe.fit(train.X, train.y, mask=train.mask, groups=np.asarray(train.patients))
        path = probe.path_
        extra = {
            "val_score_per_C": dict(zip(map(float, path.Cs), map(float, path.score), strict=True)),
            "val_metric": path.metric,
            "converged": bool(np.all(probe.converged_)),
        }
        return KindResult(
            {"C": float(probe.C_)}, extra, scores=probe.predict_proba(data.test.X),
            val_scores=_val_scores(probe, val),
        )  # fmt: skip


class KNNKind:
    name = "knn"
    curve: str | None = None

    def default_pooling(self, stored: Collection[str]) -> str:
        return _stored_default(stored, "")

    def params(self, request: ProbeRequest) -> dict[str, Any]:
        return {"ks": list(request.ks), "temperature": 0.07, "backend": request.backend}

    def fit_score(self, request: ProbeRequest, data: ProbeData) -> KindResult:
        from embedkit.probes.knn import KNNProbe

        train, val = data.train, data.val
        ks = tuple(k for k in request.ks if k <= len(train.ids)) or (len(train.ids),)
        probe = KNNProbe(k=ks, backend=request.backend, progress=current_progress())
        probe.fit(train.X, train.y, mask=train.mask)
        if len(val.ids):
            by_k = {k: _point(val, s) for k, s in probe.predict_proba_per_k(val.X).items()}
            finite = {k: v for k, v in by_k.items() if np.isfinite(v)}
            best = max(finite, key=lambda k: (finite[k], -k)) if finite else 20
        else:
            by_k, best = {}, min(ks, key=lambda k: abs(k - 20))
        return KindResult(
            {"k": int(best)},
            {"val_score_per_k": {int(k): v for k, v in by_k.items()}},
            scores=probe.predict_proba(data.test.X, k=best),
            val_scores=probe.predict_proba(val.X, k=best) if len(val.ids) else None,
        )


class SGDKind:
    name = "sgd"
    curve: str | None = None

    def default_pooling(self, stored: Collection[str]) -> str:
        return _stored_default(stored, "+mean")

    def params(self, request: ProbeRequest) -> dict[str, Any]:
        from embedkit.probes.sgd import DINO_LR_GRID, SGDLinearProbe

        probe = SGDLinearProbe()
        return {
            "lrs": list(DINO_LR_GRID),
            "batch_size": probe.batch_size,
            "epochs": probe.epochs,
            "momentum": probe.momentum,
            "standardize": probe.standardize,
        }

    def fit_score(self, request: ProbeRequest, data: ProbeData) -> KindResult:
        from embedkit.probes.sgd import SGDLinearProbe

        train, val = data.train, data.val
        probe = SGDLinearProbe(seed=request.seed)
        if len(val.ids):
            probe.fit_select(train.X, train.y, train.mask, val.X, val.y, val.mask)
        else:  # no validation split: hold out 10% of train by patient (DINOv2 protocol)
            probe.fit(train.X, train.y, mask=train.mask, groups=np.asarray(train.patients))
        extra = {
            "val_score_per_lr": {float(k): float(v) for k, v in probe.val_scores_.items()},
            "val_metric": probe.val_metric_,
            "lr_scaled": probe.lr_scaled_,
        }
        return KindResult(
            {"lr": probe.lr_}, extra, scores=probe.predict_proba(data.test.X),
            val_scores=_val_scores(probe, val),
        )  # fmt: skip


class FewShotKind:
    name = "fewshot"
    curve: str | None = "shots"

    def default_pooling(self, stored: Collection[str]) -> str:
        return _stored_default(stored, "+mean")

    def params(self, request: ProbeRequest) -> dict[str, Any]:
        return {"shots": list(request.shots), "draws": request.draws, "classifier": "linear",
                "C": 1.0, "tol": DEFAULT_TOL}  # fmt: skip

    def fit_score(self, request: ProbeRequest, data: ProbeData) -> KindResult:
        from embedkit.probes.fewshot import run_fewshot

        train, test = data.train, data.test
        metrics: dict[str, Any] = {}
        runs: dict[str, Any] = {}
        notes: list[str] = []
        total = len(request.shots) * request.draws
        with current_progress()(total, "few-shot draws") as advance:
            for n_shots in request.shots:
                try:
                    fs = run_fewshot(
                        train.X, train.y, train.mask, np.asarray(train.patients),
                        test.X, test.y, test.mask, shots=(n_shots,),
                        seeds=range(request.seed, request.seed + request.draws), task=data.task,
                        progress=lambda _total, _desc: nullcontext(advance),
                    )  # fmt: skip
                except FewShotSamplingError as exc:
                    named = re.sub(
                        r"label (\d+)", lambda m: f"'{data.labels[int(m[1])]}'", str(exc)
                    )
                    notes.append(f"{n_shots}-shot skipped: {named}")
                    advance(request.draws)
                    continue
                metrics[f"{n_shots}-shot"] = fs.summary[n_shots]
                runs.update({f"{n}-shot/seed{s}": v for (n, s), v in fs.runs.items()})
        if not metrics:
            raise EmbedkitError(
                f"few-shot: no shot count in {list(request.shots)} can be drawn from the train "
                f"split of {data.dataset}: " + "; ".join(notes)
            )
        return KindResult({}, {"runs": runs}, metrics=metrics, notes=notes)


for _kind in (LinearKind(), KNNKind(), FewShotKind(), SGDKind()):
    register(_kind)

# The segmentation kind registers itself on import (embedkit.probes.segmentation).
from embedkit.probes import segmentation as _segmentation  # noqa: E402, F401
