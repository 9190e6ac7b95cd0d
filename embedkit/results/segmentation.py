"""What a segmentation result adds to a record: the task name and the overlay cases beside it.

A segmentation record (``task = "segmentation"``, frozen probe or finetuned) has ``labels`` = the
class names without background, ``metrics`` = ``{"dice": {point, low, high}, "iou": {...}}``
(+ ``"hd95"`` for volumes), ``per_label`` = one ``{"label", "dice", "iou"(, "hd95")}`` per class,
and as its scores the per-image (2D) or per-volume (3D) Dice, shape (n, L), keyed by image or
volume id, so the report pairs two runs by id as it does for classification. Both record kinds
write this table with :func:`dice_table`, so the targets are the same for every run on the
data: ``y`` 1 where the class is in the case's truth, ``mask`` 1 everywhere (targets depend on
the data only, never on a prediction), ``scores`` the Dice, NaN where the class is absent from
both truth and prediction (no score; left out of every mean, docs/statistics.md).

Beside ``<record>.json`` lies ``<record>.overlays.npz`` (its file name in
``record.extra["overlays"]``): a few best and worst test cases as ``image`` (k, H, W) float in
[0, 1], ``truth`` and ``pred`` (k, H, W) int label maps, ``ids`` (k,) and ``mean_dice`` (k,).
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from embedkit.atomic import atomic_write
from embedkit.errors import CacheNotFoundError, IntegrityError
from embedkit.results.records import ResultRecord, ResultsDir, ScoreTable

if TYPE_CHECKING:
    from embedkit.eval.segmentation import SegmentationScores

__all__ = [
    "OVERLAYS_SUFFIX",
    "SEGMENTATION_TASK",
    "Overlays",
    "dice_table",
    "is_segmentation",
    "load_overlays",
    "overlays_name",
    "write_overlays",
]

SEGMENTATION_TASK = "segmentation"
OVERLAYS_SUFFIX = ".overlays.npz"


def is_segmentation(record: ResultRecord) -> bool:
    return record.task == SEGMENTATION_TASK


def dice_table(scores: SegmentationScores) -> ScoreTable:
    """The score table of a segmentation record (semantics in the module docstring)."""
    return ScoreTable(
        scores.ids,
        scores.labels,
        scores.in_truth.astype(np.float32),
        np.ones(scores.dice.shape, dtype=bool),
        scores.dice,
    )


@dataclass(frozen=True, eq=False)
class Overlays:
    """Example test cases of a segmentation run (see the module docstring for the shapes)."""

    image: np.ndarray
    truth: np.ndarray
    pred: np.ndarray
    ids: np.ndarray
    mean_dice: np.ndarray

    def __post_init__(self) -> None:
        k = len(self.ids)
        shapes = {a.shape for a in (self.image, self.truth, self.pred)}
        if len(shapes) != 1 or next(iter(shapes))[:1] != (k,) or len(next(iter(shapes))) != 3:
            raise IntegrityError(
                f"Expected image, truth and pred of one shape (k, H, W) with k = {k} ids, got "
                f"{self.image.shape}, {self.truth.shape}, {self.pred.shape} instead"
            )
        if self.mean_dice.shape != (k,):
            raise IntegrityError(
                f"Expected {k} mean Dice values, got shape {self.mean_dice.shape} instead"
            )


def overlays_name(record: ResultRecord) -> str:
    """The file name of ``record``'s overlays (beside its JSON)."""
    return Path(record.relpath()).name + OVERLAYS_SUFFIX


def write_overlays(out: ResultsDir, record: ResultRecord, overlays: Overlays) -> Path:
    """Write ``overlays`` beside where ``out`` writes ``record`` (before the record itself, so
    a record never names a missing file)."""
    json_path, _ = out.paths(record)
    path = json_path.with_name(overlays_name(record))
    buffer = io.BytesIO()
    np.savez_compressed(
        buffer,
        image=overlays.image.astype(np.float32),
        truth=overlays.truth.astype(np.int64),
        pred=overlays.pred.astype(np.int64),
        ids=np.asarray(overlays.ids, dtype=str),
        mean_dice=overlays.mean_dice.astype(np.float64),
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(buffer.getvalue()))
    return path


def load_overlays(json_path: str | os.PathLike[str], record: ResultRecord) -> Overlays | None:
    """The overlays ``record`` (read from ``json_path``) names, or None when it names none."""
    name = record.extra.get("overlays")
    if not isinstance(name, str):
        return None
    path = Path(json_path).with_name(name)
    if not path.is_file():
        raise CacheNotFoundError(f"{json_path} names overlays {name} but {path} is missing")
    with np.load(path, allow_pickle=False) as data:
        return Overlays(
            image=data["image"],
            truth=data["truth"],
            pred=data["pred"],
            ids=data["ids"],
            mean_dice=data["mean_dice"],
        )
