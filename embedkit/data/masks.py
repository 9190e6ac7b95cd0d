"""Label maps (segmentation masks): read, check against the classes, and map onto the model grid.

A label map holds one class id per pixel (or voxel): ``0 .. len(classes) - 1``, where
``classes`` is the dataset's ``classes:`` list in the manifest and ``classes[0]`` is the
background. Readers keep the stored integers (never rescaled like images):

- PNG (and other Pillow formats): modes ``L``, ``P`` (the palette *index* is the class id),
  ``1``, ``I;16*`` and ``I``; colour (``RGB``/``RGBA``) masks are refused: store class ids.
- NIfTI (``.nii``, ``.nii.gz``, via nibabel, imported on use): the data array as stored
  (``dataobj``, no scaling), integer-valued; the voxel spacing from the header's zooms.
- The label map of a **volume** row (a volume dataset: one row per slice):
  :func:`read_volume_labels` reads it through :func:`embedkit.data.volumes.volume_stack`, so
  slice ``k`` of the label map is on the grid, and in the orientation, of image slice ``k``
  (RAS reorientation, the dataset's slice axis, radiological display); its ``spacing`` is
  permuted the same way: ``(slice, row, column)`` in mm, the axes of the ``(n, H, W)`` stack.

Geometry follows the image's :class:`~embedkit.data.transforms.Preprocessing` ``resize`` mode,
with **nearest-neighbour** sampling (pixel centres: output pixel ``i`` takes input pixel
``floor((i + 0.5) * in / out)``), so no class id is ever blended:

- :func:`to_model_grid` turns a mask into the square ``size x size`` frame the encoder saw
  (squash: resize; pad: letterbox with background, centred; crop: centre square), for training;
- :func:`logits_to_mask` upsamples (bilinearly) a ``(C, h, w)`` logit grid back onto the mask's
  own pixels, for evaluation at the mask resolution; with ``crop`` only the centre square the
  model saw is scored (:func:`scored_region`).

Errors: an unreadable file is :class:`~embedkit.errors.ImageReadError`; a mask whose shape
differs from its image's, or that holds ids outside ``classes``, is
:class:`~embedkit.errors.ManifestError` naming the file and the fix.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from embedkit.data.policies import ResizeMode, SliceAxis
from embedkit.errors import ImageNotFoundError, ImageReadError, ManifestError

if TYPE_CHECKING:
    import os

    import torch

    from embedkit.data.volumes import VolumeSlice

__all__ = [
    "LabelMap",
    "RowLabelMaps",
    "check_label_map",
    "image_shape",
    "logits_to_mask",
    "nearest_resize",
    "read_label_map",
    "read_volume_labels",
    "scored_region",
    "stack_geometry",
    "to_model_grid",
]

NIFTI_SUFFIXES = (".nii", ".nii.gz")
_PIL_LABEL_MODES = ("1", "L", "P", "I;16", "I;16L", "I;16B", "I")


@dataclass(frozen=True, eq=False)
class LabelMap:
    """One label map: ``ids`` (H, W), (X, Y, Z), or for a volume's slices (n, H, W), int64, and
    its voxel ``spacing`` along those axes."""

    path: Path
    ids: np.ndarray
    spacing: tuple[float, ...]


def _is_nifti(path: Path) -> bool:
    return path.name.lower().endswith(NIFTI_SUFFIXES)


def read_label_map(path: str | Path) -> LabelMap:
    """Read a PNG or NIfTI label map (see the module docstring); integers are kept as stored."""
    path = Path(path)
    if not path.is_file():
        raise ImageNotFoundError(path, "mask file not found; check the manifest's `mask` column")
    if _is_nifti(path):
        return _read_nifti(path)
    try:
        with Image.open(path) as opened:
            opened.load()
            if opened.mode not in _PIL_LABEL_MODES:
                raise ImageReadError(
                    path,
                    f"a label map must be single-channel (modes {', '.join(_PIL_LABEL_MODES)}), "
                    f"got mode {opened.mode}; save one class id per pixel, not colours",
                )
            ids = np.asarray(opened, dtype=np.int64)
    except ImageReadError:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise ImageReadError(path, f"corrupt or unreadable label map: {exc}") from exc
    return LabelMap(path, ids, (1.0, 1.0))


def _read_nifti(path: Path) -> LabelMap:
    import nibabel as nib

    try:
        image: Any = nib.load(str(path))  # a Nifti1Image / Nifti2Image
        data = np.asarray(image.dataobj)
        zooms = tuple(float(z) for z in image.header.get_zooms()[: data.ndim])
    except Exception as exc:  # nibabel raises many types for a bad file
        raise ImageReadError(path, f"corrupt or unreadable NIfTI label map: {exc}") from exc
    if data.ndim not in (2, 3):
        raise ImageReadError(path, f"expected a 2D or 3D label map, got shape {data.shape}")
    return LabelMap(path, _integral(path, data), zooms)


def _integral(path: Path, data: np.ndarray) -> np.ndarray:
    """``data`` as int64 if it holds integers only, else an :class:`ImageReadError`."""
    integral = np.issubdtype(data.dtype, np.integer)
    if not integral and not (np.all(np.isfinite(data)) and np.array_equal(data, np.round(data))):
        raise ImageReadError(path, f"label map holds non-integer values ({data.dtype})")
    return data.astype(np.int64)


def stack_geometry(
    path: str | Path, slice_axis: SliceAxis
) -> tuple[tuple[int, int, int], tuple[float, float, float]]:
    """Shape ``(n, H, W)`` and voxel spacing (mm) of a volume's slice stack along
    ``slice_axis``, from its header: the grid after RAS reorientation, permuted as
    :func:`~embedkit.data.volumes.slice_stack` permutes it (rows run along the larger remaining
    RAS axis, columns along the smaller)."""
    import nibabel.orientations as nio

    from embedkit.data.volumes import SLICE_AXES, read_volume_header

    header = read_volume_header(path)
    zooms = np.sqrt((header.affine[:3, :3] ** 2).sum(0))
    ornt = np.asarray(nio.io_orientation(header.affine))  # type: ignore[no-untyped-call]
    ras, size = np.empty(3), np.empty(3, dtype=np.int64)
    ras[ornt[:, 0].astype(int)] = zooms
    size[ornt[:, 0].astype(int)] = header.shape
    s = SLICE_AXES[slice_axis]
    p, q = (a for a in range(3) if a != s)
    shape = (int(size[s]), int(size[q]), int(size[p]))
    return shape, (float(ras[s]), float(ras[q]), float(ras[p]))


def read_volume_labels(path: str | Path, slice_axis: SliceAxis) -> LabelMap:
    """A volume's label map as its ``(n, H, W)`` slices along ``slice_axis``, on the grid and in
    the orientation of the image slices (:func:`~embedkit.data.volumes.volume_stack`), with the
    stack's spacing (:func:`stack_geometry`)."""
    from embedkit.data.volumes import volume_stack

    path = Path(path)
    if not path.exists():
        raise ImageNotFoundError(path, "mask file not found; check the manifest's `mask` column")
    stack = volume_stack(path, slice_axis)
    return LabelMap(path, _integral(path, np.asarray(stack)), stack_geometry(path, slice_axis)[1])


def check_label_map(
    mask: LabelMap, classes: Sequence[str], image_shape: tuple[int, ...] | None = None
) -> LabelMap:
    """``mask`` itself if its ids are in ``0 .. len(classes) - 1`` and its shape is the image's;
    else a :class:`ManifestError` saying what differs."""
    if image_shape is not None and tuple(mask.ids.shape) != tuple(image_shape):
        raise ManifestError(
            f"{mask.path}: mask shape {mask.ids.shape} does not match its image's "
            f"{tuple(image_shape)}; a label map must have one id per image pixel"
        )
    present = np.unique(mask.ids)
    bad = present[(present < 0) | (present >= len(classes))]
    if bad.size:
        raise ManifestError(
            f"{mask.path}: class ids {bad.tolist()} are not in the dataset's classes "
            f"(0..{len(classes) - 1}: {', '.join(classes)}); add the class to `classes:` in "
            "the manifest or fix the label map"
        )
    return mask


class RowLabelMaps:
    """The label map of each row of a dataset with ``classes:``, checked against the classes and
    the image's shape: ``masks[i]`` for image ``images[i]``, or, for a volume dataset
    (``volume_slices`` given), slice ``volume_slices[i].index`` of the volume's label map read by
    :func:`read_volume_labels` on the image slices' grid. The last volume read is kept, so the
    slices of one volume read its label map once. The one reader of the probe and finetuning."""

    def __init__(
        self,
        masks: Sequence[Path],
        images: Sequence[str | os.PathLike[str]],
        classes: Sequence[str],
        volume_slices: Sequence[VolumeSlice] | None = None,
    ) -> None:
        self.masks, self.images = tuple(masks), tuple(images)
        self.classes = tuple(classes)
        self.volume_slices = None if volume_slices is None else tuple(volume_slices)
        self._volume: LabelMap | None = None

    def row(self, i: int) -> tuple[np.ndarray, tuple[float, ...]]:
        """(2D label map, its spacing) of row ``i``; for a slice of a volume the spacing is the
        stack's ``(slice, row, column)`` spacing."""
        path = self.masks[i]
        if self.volume_slices is not None:
            source = self.volume_slices[i]
            if self._volume is None or self._volume.path != path:
                axis = source.spec.slice_axis
                expected = stack_geometry(source.volume, axis)[0]
                self._volume = check_label_map(
                    read_volume_labels(path, axis), self.classes, expected
                )
            return self._volume.ids[source.index], self._volume.spacing
        label_map = read_label_map(path)
        if label_map.ids.ndim != 2:
            raise ManifestError(
                f"{path}: a 2D image needs a 2D label map, got shape {label_map.ids.shape}; "
                "for volumes give the dataset a `volumes:` block in the manifest"
            )
        check_label_map(label_map, self.classes, image_shape(self.images[i]))
        return label_map.ids, label_map.spacing


def image_shape(path: str | os.PathLike[str]) -> tuple[int, ...]:
    """(H, W) of an image from its header when Pillow can read it, else by reading it."""
    try:
        with Image.open(Path(path)) as opened:
            width, height = opened.size
            return (height, width)
    except (OSError, SyntaxError, ValueError):
        from embedkit.data.readers import read_image

        return tuple(read_image(path).shape[:2])


def _nearest_index(n_in: int, n_out: int) -> np.ndarray:
    idx = np.floor((np.arange(n_out) + 0.5) * (n_in / n_out)).astype(np.int64)
    out: np.ndarray = np.minimum(idx, n_in - 1)
    return out


def nearest_resize(ids: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of a 2D label map to ``shape`` (pixel-centre rule)."""
    if ids.shape == shape:
        return ids
    rows, cols = _nearest_index(ids.shape[0], shape[0]), _nearest_index(ids.shape[1], shape[1])
    out: np.ndarray = ids[np.ix_(rows, cols)]
    return out


def _square(shape: tuple[int, int], mode: ResizeMode) -> tuple[int, int, int, int]:
    """(side_h, side_w, top, left): the frame the encoder's square covers, in mask pixels, and
    where the mask's (0, 0) sits in it (negative for crop: the mask extends past the frame)."""
    h, w = shape
    if mode == "squash":
        return h, w, 0, 0
    if mode == "pad":
        side = max(h, w)
        return side, side, (side - h) // 2, (side - w) // 2
    side = min(h, w)
    return side, side, -((h - side) // 2), -((w - side) // 2)


def to_model_grid(ids: np.ndarray, mode: ResizeMode, size: int) -> np.ndarray:
    """The ``size x size`` label map of the square the encoder saw (background where padded)."""
    h, w = ids.shape
    side_h, side_w, top, left = _square((h, w), mode)
    if mode == "pad":
        framed = np.zeros((side_h, side_w), dtype=ids.dtype)
        framed[top : top + h, left : left + w] = ids
    elif mode == "crop":
        framed = ids[-top : -top + side_h, -left : -left + side_w]
    else:
        framed = ids
    return nearest_resize(framed, (size, size))


def scored_region(shape: tuple[int, int], mode: ResizeMode) -> tuple[slice, slice]:
    """The rows and columns of a mask that the encoder saw (all but with ``crop``)."""
    side_h, side_w, top, left = _square(shape, mode)
    if mode != "crop":
        return slice(0, shape[0]), slice(0, shape[1])
    return slice(-top, -top + side_h), slice(-left, -left + side_w)


def logits_to_mask(logits: torch.Tensor, shape: tuple[int, int], mode: ResizeMode) -> torch.Tensor:
    """``(C, h, w)`` logits upsampled bilinearly onto the mask pixels of
    :func:`scored_region` (``(C, H, W)`` for squash and pad)."""
    import torch.nn.functional as F

    side_h, side_w, top, left = _square(shape, mode)
    up = F.interpolate(
        logits[None].float(), size=(side_h, side_w), mode="bilinear", align_corners=False
    )[0]
    if mode == "pad":
        return up[:, top : top + shape[0], left : left + shape[1]]
    return up
