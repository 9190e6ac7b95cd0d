"""Segmentation metrics on label maps: per-class Dice, IoU and HD95, with bootstrap CIs.

Inputs are integer label maps of one image (2D) or one volume (3D), truth and prediction of the
same shape, class ids ``0 .. n_classes - 1`` with 0 the background. Scores are per case (image
or volume) and per foreground class ``1 .. n_classes - 1``.

Conventions (also in the README, "Segmentation probe"):

- **Dice** ``2|T∩P| / (|T| + |P|)``, **IoU** ``|T∩P| / |T∪P|`` per class and case. A class
  absent from both truth and prediction has no score (NaN): it is left out of that class's mean,
  never counted as a perfect 1. Absent from truth but predicted (or the reverse): 0.
- **HD95** (3D, and 2D when asked): the 95th percentile of the symmetric surface distances, in
  the units of ``spacing`` (mm for NIfTI): the distances from every surface voxel of T to the
  surface of P and from every surface voxel of P to the surface of T, pooled (medpy's ``hd95``).
  The surface of a mask is its voxels with a face neighbour (6-connectivity in 3D, 4 in 2D)
  outside it, or on the array border; distances are Euclidean between voxel centres, computed
  with :func:`scipy.ndimage.distance_transform_edt` and ``sampling=spacing``. Both empty: NaN
  (left out, as for Dice). Exactly one empty: the diagonal of the case's extent
  (``sqrt(sum((shape * spacing)^2))``), the largest distance the case allows, so a missed or
  hallucinated organ counts as the worst distance rather than disappearing from the mean.
- **Dataset summary** of one class: the mean over cases of that class's scores (NaN left out).
  The headline ``dice`` / ``iou`` / ``hd95`` is the mean of the class means. Its 95% CI and the
  per-class CIs come from the percentile bootstrap over cases (images in 2D, volumes in 3D) with
  :func:`embedkit.eval.bootstrap.bootstrap_indices` / :func:`~embedkit.eval.bootstrap.bootstrap_ci`;
  one resample array is drawn per call and shared by every class and metric.

Predictions that arrive row by row (an image, or a slice of a volume) are turned into cases by
:class:`CaseScorer`, which the frozen probe and the finetuning baseline share: a volume's slices
are stacked along axis 0 in slice order (the label-map stack's order, so ``spacing`` is that of
the stack) and scored as one 3D case with HD95. :func:`ranked_cases` picks the best and worst
cases by mean Dice for the overlay figure.

scipy loads inside :func:`hd95` only.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from embedkit.errors import MetricInputError

__all__ = [
    "CaseScorer",
    "SegmentationScores",
    "case_means",
    "case_scores",
    "dice_iou",
    "hd95",
    "macro_dice",
    "mean_dice",
    "ranked_cases",
    "summarize_segmentation",
    "surface_distances",
]

FloatArray = NDArray[np.float64]


def _label_maps(truth: ArrayLike, pred: ArrayLike, n_classes: int) -> tuple[NDArray[Any], ...]:
    t, p = np.asarray(truth), np.asarray(pred)
    if t.shape != p.shape:
        raise MetricInputError(
            f"Expected truth and prediction of the same shape, got {t.shape} and {p.shape} instead"
        )
    if t.ndim not in (2, 3):
        raise MetricInputError(f"Expected 2D or 3D label maps, got {t.ndim} dimensions instead")
    if n_classes < 2:
        raise MetricInputError(f"Expected n_classes >= 2 (background + 1), got {n_classes}")
    for name, a in (("truth", t), ("prediction", p)):
        if not np.issubdtype(a.dtype, np.integer) and a.dtype != np.bool_:
            raise MetricInputError(f"Expected an integer {name} label map, got {a.dtype} instead")
        if a.size and (int(a.min()) < 0 or int(a.max()) >= n_classes):
            raise MetricInputError(
                f"{name} holds class ids in [{int(a.min())}, {int(a.max())}]; expected ids in "
                f"[0, {n_classes - 1}] (0 = background)"
            )
    return t, p


def dice_iou(truth: ArrayLike, pred: ArrayLike, n_classes: int) -> tuple[FloatArray, FloatArray]:
    """Per foreground class Dice and IoU of one case: two ``(n_classes - 1,)`` arrays (NaN where
    the class is absent from both)."""
    t, p = _label_maps(truth, pred, n_classes)
    t_count = np.bincount(t.ravel(), minlength=n_classes)[1:].astype(np.float64)
    p_count = np.bincount(p.ravel(), minlength=n_classes)[1:].astype(np.float64)
    same = t.ravel()[t.ravel() == p.ravel()]
    inter = np.bincount(same, minlength=n_classes)[1:].astype(np.float64)
    total = t_count + p_count
    union = total - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        dice = np.where(total > 0, 2.0 * inter / total, np.nan)
        iou = np.where(union > 0, inter / union, np.nan)
    return dice, iou


def _spacing(spacing: Sequence[float] | None, ndim: int) -> tuple[float, ...]:
    if spacing is None:
        return (1.0,) * ndim
    values = tuple(float(s) for s in spacing)
    if len(values) != ndim or not all(np.isfinite(v) and v > 0 for v in values):
        raise MetricInputError(
            f"Expected {ndim} positive voxel spacings, got {tuple(spacing)} instead"
        )
    return values


def _surface(mask: NDArray[np.bool_]) -> NDArray[np.bool_]:
    """Voxels of ``mask`` with a face neighbour outside it (the array border counts as outside)."""
    from scipy import ndimage

    inner = ndimage.binary_erosion(mask, border_value=0)
    return np.asarray(mask & ~inner, dtype=bool)


def surface_distances(
    a: ArrayLike, b: ArrayLike, spacing: Sequence[float] | None = None
) -> FloatArray:
    """Distances from every surface voxel of binary mask ``a`` to the surface of ``b`` (both
    non-empty), in the units of ``spacing``."""
    from scipy import ndimage

    ma, mb = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    sampling = _spacing(spacing, ma.ndim)
    sa, sb = _surface(ma), _surface(mb)
    to_b = ndimage.distance_transform_edt(~sb, sampling=sampling)
    return np.asarray(to_b[sa], dtype=np.float64)


def hd95(truth: ArrayLike, pred: ArrayLike, spacing: Sequence[float] | None = None) -> float:
    """95th-percentile symmetric surface distance of two binary masks (see the conventions)."""
    t, p = np.asarray(truth, dtype=bool), np.asarray(pred, dtype=bool)
    if t.shape != p.shape:
        raise MetricInputError(
            f"Expected masks of the same shape, got {t.shape} and {p.shape} instead"
        )
    sampling = _spacing(spacing, t.ndim)
    has_t, has_p = bool(t.any()), bool(p.any())
    if not has_t and not has_p:
        return float("nan")
    if has_t != has_p:
        return float(np.sqrt(np.sum((np.asarray(t.shape) * np.asarray(sampling)) ** 2)))
    both = np.concatenate([surface_distances(t, p, sampling), surface_distances(p, t, sampling)])
    return float(np.percentile(both, 95))


class SegmentationScores:
    """Per-case scores of a set of cases: ``dice`` / ``iou`` (and ``hd95``) arrays ``(n, L)``,
    row i for ``ids[i]``, column j for foreground class ``labels[j]``; ``in_truth`` (n, L)
    bool: the class is in the case's truth (all False when not given)."""

    def __init__(
        self,
        ids: Sequence[str],
        labels: Sequence[str],
        dice: FloatArray,
        iou: FloatArray,
        hd95: FloatArray | None = None,
        in_truth: NDArray[np.bool_] | None = None,
    ) -> None:
        n, n_labels = len(ids), len(labels)
        for name, a in (("dice", dice), ("iou", iou), ("hd95", hd95), ("in_truth", in_truth)):
            if a is not None and a.shape != (n, n_labels):
                raise MetricInputError(
                    f"Expected {name} of shape ({n}, {n_labels}), got {a.shape} instead"
                )
        self.ids = tuple(ids)
        self.labels = tuple(labels)
        self.dice = dice
        self.iou = iou
        self.hd95 = hd95
        self.in_truth = np.zeros((n, n_labels), bool) if in_truth is None else in_truth

    def metrics(self) -> dict[str, FloatArray]:
        out = {"dice": self.dice, "iou": self.iou}
        if self.hd95 is not None:
            out["hd95"] = self.hd95
        return out


def case_scores(
    truth: ArrayLike,
    pred: ArrayLike,
    n_classes: int,
    *,
    spacing: Sequence[float] | None = None,
    with_hd95: bool = False,
) -> dict[str, FloatArray]:
    """``{"dice", "iou"(, "hd95")}`` of one case, each ``(n_classes - 1,)``."""
    t, p = _label_maps(truth, pred, n_classes)
    dice, iou = dice_iou(t, p, n_classes)
    out = {"dice": dice, "iou": iou}
    if with_hd95:
        out["hd95"] = np.array([hd95(t == c, p == c, spacing) for c in range(1, n_classes)])
    return out


def _nanmean(values: FloatArray, axis: int | None = None) -> Any:
    """Mean without NaN; NaN (no warning) where every value is NaN."""
    finite = ~np.isnan(values)
    count = finite.sum(axis=axis)
    total = np.where(finite, values, 0.0).sum(axis=axis)
    with np.errstate(invalid="ignore", divide="ignore"):
        return total / count


def _macro(values: FloatArray) -> float:
    """Mean over classes of the per-class means over cases (classes without a score left out)."""
    return float(_nanmean(_nanmean(values, axis=0)))


def summarize_segmentation(
    scores: SegmentationScores, *, n_boot: int = 1000, seed: int = 0, level: float = 0.95
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(metrics, per_label) as records hold them: ``metrics[m] = {"point", "low", "high"}`` for
    ``m`` in dice, iou (, hd95), the mean over classes; ``per_label`` one row per class
    ``{"label", m: {"point", "low", "high"}, "n_cases": cases with a score}``. The percentile
    bootstrap resamples cases; one resample array serves every class and metric."""
    from embedkit.eval.bootstrap import bootstrap_ci, bootstrap_indices

    n = len(scores.ids)
    if n == 0:
        raise MetricInputError("no cases to summarise: the test split holds no scored image")
    idx = bootstrap_indices(n, n_boot, seed)
    dummy_y = np.zeros((n, len(scores.labels)))

    def ci(values: FloatArray) -> dict[str, float]:
        point, low, high = bootstrap_ci(
            dummy_y, None, values, lambda _y, _m, s: _macro(s), indices=idx, level=level
        )[:3]
        return {"point": point, "low": low, "high": high}

    metrics = {name: ci(values) for name, values in scores.metrics().items()}
    per_label = []
    for j, label in enumerate(scores.labels):
        row: dict[str, Any] = {"label": label}
        for name, values in scores.metrics().items():
            row[name] = ci(values[:, j : j + 1])
        row["n_cases"] = int((~np.isnan(scores.dice[:, j])).sum())
        per_label.append(row)
    return metrics, per_label


def macro_dice(scores: SegmentationScores) -> float:
    """The headline Dice: mean over classes of the per-class means over cases."""
    return _macro(scores.dice)


def case_means(dice: ArrayLike) -> FloatArray:
    """Each case's (row's) mean of ``dice`` (n, L) over the classes it has a score for (NaN:
    none): the per-case unit of the overlays and of the report's paired Dice comparison."""
    return np.asarray(_nanmean(np.asarray(dice, dtype=np.float64), axis=1), dtype=np.float64)


def mean_dice(scores: SegmentationScores) -> FloatArray:
    """:func:`case_means` of ``scores.dice``."""
    return case_means(scores.dice)


def ranked_cases(scores: SegmentationScores, k: int) -> list[int]:
    """The ``k`` best and then the ``k`` worst cases by :func:`mean_dice` (each once), best
    first; cases without a score rank last."""
    mean = np.nan_to_num(mean_dice(scores), nan=-1.0)
    ranked: list[int] = np.argsort(-mean, kind="stable").tolist()
    best = ranked[:k]
    return best + [c for c in ranked[-k:] if c not in best]


class CaseScorer:
    """Per-case scores of label maps predicted row by row, for ``n_preds`` predictions per row
    (e.g. one per head) scored apart.

    :meth:`add` a row: a 2D image is its own case, scored at once (no HD95); a slice of a volume
    (``slice_at`` given, ``case`` the volume) is kept until the volume's ``expected[case]``
    slices have come (or :meth:`finish`), then the slices are stacked along axis 0 in slice
    order and scored as one 3D case, with HD95 in ``spacing`` (the stack's) when ``with_hd95``.
    ``shown[case]`` is the ``key`` of the case's row with the most foreground in the truth."""

    def __init__(
        self,
        classes: Sequence[str],
        *,
        n_preds: int = 1,
        expected: Mapping[str, int] | None = None,
        with_hd95: bool = True,
    ) -> None:
        self.n_classes = len(classes)
        self.labels = tuple(classes[1:])
        self.n_preds = n_preds
        self.expected = dict(expected or {})
        self.with_hd95 = with_hd95
        self.shown: dict[str, int] = {}
        self._ids: list[str] = []
        self._in_truth: list[NDArray[np.bool_]] = []
        self._scores: list[dict[str, list[FloatArray]]] = [{} for _ in range(n_preds)]
        self._pending: dict[str, dict[int, tuple[np.ndarray, Sequence[np.ndarray]]]] = {}
        self._spacing: dict[str, Sequence[float] | None] = {}
        self._foreground: dict[str, int] = {}

    def add(
        self,
        case: str,
        truth: np.ndarray,
        preds: Sequence[np.ndarray],
        spacing: Sequence[float] | None = None,
        *,
        key: int = 0,
        slice_at: int | None = None,
    ) -> None:
        """One row's truth and its ``n_preds`` predictions (see the class docstring)."""
        if len(preds) != self.n_preds:
            raise MetricInputError(f"Expected {self.n_preds} predictions, got {len(preds)}")
        foreground = int(np.count_nonzero(truth))
        if case not in self._foreground or foreground > self._foreground[case]:
            self._foreground[case], self.shown[case] = foreground, key
        if slice_at is None:
            self._score(case, truth, preds, None, hd=False)
            return
        slices = self._pending.setdefault(case, {})
        slices[int(slice_at)] = (truth, preds)
        self._spacing[case] = spacing
        if len(slices) == self.expected.get(case, -1):
            self._close(case)

    def _close(self, case: str) -> None:
        slices = self._pending.pop(case)
        order = sorted(slices)
        shapes = {slices[k][0].shape for k in order}
        if len(shapes) != 1:
            raise MetricInputError(
                f"volume {case}: its slices' label maps differ in size: {shapes}"
            )
        truth = np.stack([slices[k][0] for k in order])
        preds = [np.stack([slices[k][1][j] for k in order]) for j in range(self.n_preds)]
        self._score(case, truth, preds, self._spacing.pop(case), hd=self.with_hd95)

    def _score(
        self,
        case: str,
        truth: np.ndarray,
        preds: Sequence[np.ndarray],
        spacing: Sequence[float] | None,
        *,
        hd: bool,
    ) -> None:
        self._ids.append(case)
        counts = np.bincount(np.asarray(truth, np.int64).ravel(), minlength=self.n_classes)
        self._in_truth.append(counts[1 : self.n_classes] > 0)
        for j, pred in enumerate(preds):
            out = case_scores(truth, pred, self.n_classes, spacing=spacing, with_hd95=hd)
            for name, values in out.items():
                self._scores[j].setdefault(name, []).append(values)

    def finish(self) -> list[SegmentationScores]:
        """Score the volumes still pending (some slices never came), then every prediction's
        :class:`SegmentationScores`."""
        for case in list(self._pending):
            self._close(case)
        if not self._ids:
            raise MetricInputError("no cases to score: no row was added")
        in_truth = np.array(self._in_truth, dtype=bool).reshape(len(self._ids), -1)
        out = []
        for per in self._scores:
            arrays = {name: np.stack(values) for name, values in per.items()}
            hd = arrays.get("hd95") if len(arrays.get("hd95", ())) == len(self._ids) else None
            out.append(
                SegmentationScores(
                    self._ids, self.labels, arrays["dice"], arrays["iou"], hd, in_truth
                )
            )
        return out
