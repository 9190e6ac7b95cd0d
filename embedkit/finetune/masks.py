"""Label maps for segmentation finetuning: the manifest's ``mask`` column and the files it names.

A label map holds one integer per pixel: 0 is background, ``k`` (1..K) the ``k``-th class.

- **PNG** (any single-channel mode Pillow reads: ``L``, ``I``, ``I;16``, ``P``; an RGB file whose
  three channels are equal is taken as grey), read with Pillow;
- **NIfTI** (``.nii`` / ``.nii.gz``), read with nibabel: a 2D map, or a 3D volume of which the
  row's slice is taken along the last axis (nibabel's array order, axial for RAS volumes). The
  slice index comes from the image id ``<volume id>/<slice>`` that volume datasets give each row.

The mask paths come from a ``mask`` column of the dataset's index, relative to its ``images``
folder like the image paths. The class names come from the dataset's ``classes`` list when the
manifest has one (a leading ``background`` entry is dropped); without it the classes are the
label values found in the training masks, named ``"1"`` .. ``"K"``.
"""

from __future__ import annotations

import functools
import hashlib
import posixpath
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from embedkit.errors import ImageNotFoundError, ImageReadError, ManifestError
from embedkit.manifest import DatasetConfig, DatasetTable

__all__ = [
    "MASK_COLUMN",
    "MaskSet",
    "read_label_map",
    "slice_index",
]

#: The index column holding each row's label-map path.
MASK_COLUMN = "mask"

_NIFTI_SUFFIXES = (".nii", ".nii.gz")


def slice_index(image_id: str) -> int | None:
    """The slice of ``<volume id>/<slice>`` ids (None when the id has no numeric last part)."""
    _, sep, last = image_id.rpartition("/")
    return int(last) if sep and last.isdigit() else None


def _is_nifti(path: Path) -> bool:
    return path.name.lower().endswith(_NIFTI_SUFFIXES)


def read_label_map(path: str | Path, slice_at: int | None = None) -> np.ndarray:
    """The (H, W) int64 label map in ``path``; ``slice_at`` picks the slice of a 3D NIfTI."""
    path = Path(path)
    if not path.is_file():
        raise ImageNotFoundError(path, "label map not found; check the mask column")
    try:
        if _is_nifti(path):
            data = _nifti(str(path), path.stat().st_mtime_ns)
        else:
            from PIL import Image

            with Image.open(path) as image:
                data = np.asarray(image)
    except (OSError, ValueError) as exc:
        raise ImageReadError(path, f"cannot read the label map ({exc})") from exc
    data = np.squeeze(data) if data.ndim > 2 and 1 in data.shape[2:] else data
    if data.ndim == 3 and not _is_nifti(path) and data.shape[2] in (3, 4):
        if not (np.array_equal(data[..., 0], data[..., 1]) and
                np.array_equal(data[..., 0], data[..., 2])):  # fmt: skip
            raise ImageReadError(
                path,
                "expected a single-channel label map, got a colour image whose "
                "channels differ; save the class ids as a greyscale (mode L or I) PNG",
            )
        data = data[..., 0]
    if data.ndim == 3 and _is_nifti(path):
        if slice_at is None:
            raise ImageReadError(
                path, "a 3D label map needs a slice; give the row an id <volume id>/<slice>"
            )
        if not 0 <= slice_at < data.shape[2]:
            raise ImageReadError(
                path, f"slice {slice_at} is outside the volume's {data.shape[2]} slices"
            )
        data = data[:, :, slice_at]
    if data.ndim != 2:
        raise ImageReadError(path, f"expected a 2D label map, got shape {data.shape} instead")
    if np.issubdtype(data.dtype, np.floating) and (
        not np.all(np.isfinite(data)) or not np.array_equal(data, np.round(data))
    ):
        raise ImageReadError(path, "label values must be whole numbers")
    if data.size and data.min() < 0:
        raise ImageReadError(path, f"label values must be >= 0, found {int(data.min())}")
    return np.ascontiguousarray(data, dtype=np.int64)


@functools.lru_cache(maxsize=2)
def _nifti(path: str, _mtime_ns: int) -> np.ndarray:
    """A NIfTI file's array, kept for the next reads: a volume's slices are read one row at a
    time, usually in a row, and a compressed file cannot be read one slice at a time."""
    import nibabel as nib

    data = np.asarray(nib.load(path).dataobj)  # type: ignore[attr-defined]
    data.setflags(write=False)
    return data


@dataclass(frozen=True, slots=True, eq=False)
class MaskSet:
    """The label map of every row of a dataset table, and the class names (background excluded)."""

    paths: tuple[Path, ...]
    classes: tuple[str, ...]
    inferred: bool  # the classes were counted from the training masks, not named by the manifest

    def read(self, row: int, image_id: str) -> np.ndarray:
        """Row ``row``'s label map; a value above the number of classes is an error."""
        data = read_label_map(self.paths[row], slice_index(image_id))
        top = int(data.max()) if data.size else 0
        if top > len(self.classes):
            raise ImageReadError(
                self.paths[row],
                f"label value {top} but the dataset has {len(self.classes)} "
                f"classes ({', '.join(self.classes)}); add the class to the manifest's classes",
            )
        return data

    def digest(self, root: Path) -> str:
        """SHA-256 of the class names and every mask path (relative to ``root`` when inside)."""
        h = hashlib.sha256("\x1f".join(self.classes).encode())
        for p in self.paths:
            h.update(b"\0" + str(p.relative_to(root) if p.is_relative_to(root) else p).encode())
        return h.hexdigest()

    @classmethod
    def load(cls, config: DatasetConfig, table: DatasetTable) -> MaskSet:
        """The ``mask`` column of ``config``'s index for the rows of ``table``, and the classes."""
        from embedkit.manifest.index import read_index

        index = read_index(
            config.index, {config.id_column: "id_column", MASK_COLUMN: MASK_COLUMN}
        ).frame
        by_id = dict(zip(index[config.id_column], index[MASK_COLUMN], strict=True))
        missing = [i for i in table.ids if not isinstance(by_id.get(i), str)]
        if missing:
            raise ManifestError(
                f"dataset {config.name!r}: {len(missing)} rows have no label map in the "
                f"{MASK_COLUMN!r} column (first: {', '.join(map(repr, missing[:5]))}); every "
                "image of a segmentation dataset needs one"
            )
        paths = tuple(_resolve(config, str(by_id[i])) for i in table.ids)
        named = _manifest_classes(config)
        if named is not None:
            return cls(paths, named, inferred=False)
        masks = cls(paths, (), inferred=True)
        top = 0
        for row in table.indices("train"):
            data = read_label_map(paths[row], slice_index(table.ids[row]))
            top = max(top, int(data.max()) if data.size else 0)
        if top == 0:
            raise ManifestError(
                f"dataset {config.name!r}: the training label maps hold background only; "
                "nothing to segment"
            )
        return cls(masks.paths, tuple(str(k) for k in range(1, top + 1)), inferred=True)


def _resolve(config: DatasetConfig, cell: str) -> Path:
    parts = posixpath.normpath(cell.replace("\\", "/")).split("/")
    if cell.startswith(("/", "\\")) or parts[0] == "..":
        raise ManifestError(
            f"dataset {config.name!r}: label map {cell!r} is not inside the images root "
            f"{config.images}; give paths relative to it"
        )
    return Path(config.images) / cell


def _manifest_classes(config: DatasetConfig) -> tuple[str, ...] | None:
    """The manifest's ``classes`` of the dataset (background dropped), if it declares them."""
    declared: Sequence[str] | None = getattr(config, "classes", None)
    if not declared:
        return None
    names = tuple(str(c) for c in declared)
    return names[1:] if names[0].lower() == "background" else names
