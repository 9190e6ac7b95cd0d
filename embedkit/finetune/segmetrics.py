"""Scoring segmentations: Dice, IoU and HD95 per image (2D) or per volume (3D), with CIs.

The unit scored is the image, or, for volume datasets (every image id ``<volume id>/<slice>``),
the volume: its slices' predictions at their masks' size are stacked in slice order and scored
as one 3D label map. Per class:

- **Dice** ``2|P∩T| / (|P| + |T|)`` and **IoU** ``|P∩T| / |P∪T|``; a class in neither the truth
  nor the prediction scores 1 (nothing to find, nothing found);
- **HD95** (volumes only), in voxels of the mask grid: the larger of the two directed 95th
  percentiles of the distances from one surface's voxels to the other surface (MONAI's
  ``compute_hausdorff_distance(percentile=95)``); 0 when the class is in neither, undefined
  (NaN, left out of its means) when it is in only one.

A volume's slices are kept only until its last slice is scored, so memory holds about one volume
when the index lists a volume's slices together. The overlay cases (a few best and worst units
by mean Dice) are kept while scoring, at the input resolution; for a volume, its slice with the
most foreground in the truth.

Intervals: 95% bootstrap percentile CIs over units, one set of resamples for every number.
"""

from __future__ import annotations

import contextlib
import warnings
from collections import Counter
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from embedkit.eval.bootstrap import bootstrap_indices
from embedkit.finetune.masks import slice_index
from embedkit.results.segmentation import Overlays

__all__ = [
    "OVERLAY_CASES",
    "Scorer",
    "dice_iou",
    "hd95",
    "segmentation_metrics",
    "volume_of",
]

#: Best and worst test units kept for the report's overlay figure (each).
OVERLAY_CASES = 3

_View = tuple[np.ndarray, np.ndarray, np.ndarray]  # image (H, W) float, truth, prediction


def volume_of(image_id: str) -> str:
    """``<volume id>`` of ``<volume id>/<slice>``."""
    return image_id.rpartition("/")[0]


def dice_iou(pred: np.ndarray, truth: np.ndarray, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-class Dice and IoU (classes 1..n_classes) of a label map (any shape) against its
    truth; a class in neither scores 1."""
    k = n_classes + 1
    confusion = np.bincount(
        truth.ravel().astype(np.int64) * k + pred.ravel(), minlength=k * k
    ).reshape(k, k)
    inter = np.diag(confusion)[1:].astype(np.float64)
    size_truth = confusion.sum(1)[1:].astype(np.float64)
    size_pred = confusion.sum(0)[1:].astype(np.float64)
    total = size_truth + size_pred
    empty = total == 0
    dice = np.where(empty, 1.0, 2 * inter / np.maximum(total, 1))
    iou = np.where(empty, 1.0, inter / np.maximum(total - inter, 1))
    return dice, iou


def _surface(x: np.ndarray) -> np.ndarray:
    from scipy.ndimage import binary_erosion

    surface: np.ndarray = x & ~binary_erosion(x, border_value=0)
    return surface


def hd95(pred: np.ndarray, truth: np.ndarray, n_classes: int) -> np.ndarray:
    """Per-class 95th-percentile Hausdorff distance (voxels) of two label maps (see module)."""
    from scipy.ndimage import distance_transform_edt

    out = np.empty(n_classes)
    for j in range(n_classes):
        p, t = pred == j + 1, truth == j + 1
        if not p.any() and not t.any():
            out[j] = 0.0
            continue
        if not p.any() or not t.any():
            out[j] = np.nan
            continue
        sp, st = _surface(p), _surface(t)
        to_t = distance_transform_edt(~st)[sp]
        to_p = distance_transform_edt(~sp)[st]
        out[j] = max(np.percentile(to_t, 95), np.percentile(to_p, 95))
    return out


class _Cases:
    """The ``OVERLAY_CASES`` best and worst units seen so far, with their views."""

    def __init__(self) -> None:
        self.best: list[tuple[float, int, str, _View]] = []
        self.worst: list[tuple[float, int, str, _View]] = []
        self.seen = 0

    def offer(self, score: float, unit: str, view: _View) -> None:
        item = (score, self.seen, unit, view)
        self.seen += 1
        self.best = sorted([*self.best, item], key=lambda c: (-c[0], c[1]))[:OVERLAY_CASES]
        self.worst = sorted([*self.worst, item], key=lambda c: (c[0], c[1]))[:OVERLAY_CASES]

    def overlays(self) -> Overlays:
        """Best first, each unit once."""
        picked = {c[1]: c for c in [*self.best, *self.worst]}
        cases = sorted(picked.values(), key=lambda c: (-c[0], c[1]))
        return Overlays(
            image=np.stack([c[3][0] for c in cases]).astype(np.float32),
            truth=np.stack([c[3][1] for c in cases]).astype(np.int64),
            pred=np.stack([c[3][2] for c in cases]).astype(np.int64),
            ids=np.asarray([c[2] for c in cases]),
            mean_dice=np.asarray([c[0] for c in cases], dtype=np.float64),
        )


class Scorer:
    """Scores predicted label maps image by image; for volumes, volume by volume.

    ``ids``: the image ids of every row to be scored (volume mode when all are
    ``<volume id>/<slice>``)."""

    def __init__(self, labels: Sequence[str], ids: Sequence[str]) -> None:
        self.labels = tuple(labels)
        self.n_classes = len(self.labels)
        self.volumes = bool(ids) and all(slice_index(i) is not None for i in ids)
        self.expected = Counter(volume_of(i) for i in ids) if self.volumes else Counter()
        self.units: list[str] = []
        self.dice: list[np.ndarray] = []
        self.iou: list[np.ndarray] = []
        self.hd95: list[np.ndarray] = []
        self.present: list[np.ndarray] = []
        self._pending: dict[str, dict[int, tuple[np.ndarray, np.ndarray]]] = {}
        self._view: dict[str, tuple[int, _View]] = {}
        self._cases = _Cases()

    def add(self, image_id: str, pred: np.ndarray, truth: np.ndarray, view: _View) -> None:
        """One image's prediction and truth at the mask's size, and its input-size view."""
        if not self.volumes:
            self._score(image_id, pred, truth, view)
            return
        volume, at = volume_of(image_id), slice_index(image_id)
        slices = self._pending.setdefault(volume, {})
        slices[int(at or 0)] = (pred.astype(np.uint16), truth.astype(np.uint16))
        foreground = int((truth > 0).sum())
        if volume not in self._view or foreground > self._view[volume][0]:
            self._view[volume] = (foreground, view)
        if len(slices) == self.expected[volume]:
            self._close(volume)

    def finish(self) -> None:
        """Score the volumes some of whose slices never came (unreadable)."""
        for volume in list(self._pending):
            self._close(volume)

    def _close(self, volume: str) -> None:
        slices = self._pending.pop(volume)
        shapes = {p.shape for p, _ in slices.values()}
        if len(shapes) != 1:
            raise ValueError(f"volume {volume}: its slices' label maps differ in size: {shapes}")
        order = sorted(slices)
        pred = np.stack([slices[s][0] for s in order])
        truth = np.stack([slices[s][1] for s in order])
        self._score(volume, pred, truth, self._view.pop(volume)[1])

    def _score(self, unit: str, pred: np.ndarray, truth: np.ndarray, view: _View) -> None:
        dice, iou = dice_iou(pred, truth, self.n_classes)
        self.units.append(unit)
        self.dice.append(dice)
        self.iou.append(iou)
        if self.volumes:
            self.hd95.append(hd95(pred, truth, self.n_classes))
        counts = np.bincount(truth.ravel().astype(np.int64), minlength=self.n_classes + 1)
        self.present.append(counts[1 : self.n_classes + 1] > 0)
        self._cases.offer(float(dice.mean()), unit, view)

    def overlays(self) -> Overlays:
        return self._cases.overlays()

    def metrics(self, n_boot: int, seed: int) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        return segmentation_metrics(
            self.labels,
            np.stack(self.dice),
            np.stack(self.iou),
            np.stack(self.hd95) if self.hd95 else None,
            n_boot,
            seed,
        )


def _ci(values: np.ndarray, idx: np.ndarray) -> dict[str, float | None]:
    """Mean of ``values`` (n,) with the 95% percentile interval over the resamples ``idx``
    (NaN entries left out; None where nothing is defined)."""
    if np.isnan(values).all():
        return {"point": None, "low": None, "high": None}
    with _quiet():
        replicates = np.nanmean(values[idx], axis=1)
    replicates = replicates[~np.isnan(replicates)]
    low, high = np.percentile(replicates, [2.5, 97.5])
    return {"point": float(np.nanmean(values)), "low": float(low), "high": float(high)}


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence numpy's warnings about means of all-NaN rows (those are left out on purpose)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        yield


def segmentation_metrics(
    labels: Sequence[str],
    dice: np.ndarray,
    iou: np.ndarray,
    hd: np.ndarray | None,
    n_boot: int,
    seed: int,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Mean Dice / IoU (/ HD95) over classes and units, and per class, with 95% bootstrap
    percentile CIs over units (one set of resamples for every number)."""
    idx = bootstrap_indices(dice.shape[0], n_boot, seed)
    metrics: dict[str, Any] = {"dice": _ci(dice.mean(1), idx), "iou": _ci(iou.mean(1), idx)}
    per_label: list[dict[str, Any]] = [
        {"label": name, "dice": _ci(dice[:, j], idx), "iou": _ci(iou[:, j], idx)}
        for j, name in enumerate(labels)
    ]
    if hd is not None:
        with _quiet():
            per_unit = np.nanmean(hd, axis=1)
        metrics["hd95"] = _ci(per_unit, idx)
        for j, row in enumerate(per_label):
            row["hd95"] = _ci(hd[:, j], idx)
    return metrics, per_label
