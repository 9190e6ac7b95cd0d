"""CT and MRI volumes as stacks of 2D slices for the 2D encoders.

A volume is a NIfTI file (``.nii``, ``.nii.gz``), a DICOM series (a folder holding one file per
slice) or a multi-frame DICOM file. Each is read by an entry of :data:`VOLUME_FORMATS` (a
registry: :func:`register_volume_format` adds one) into modality values (Hounsfield units for
CT) on a voxel grid with a voxel-to-world affine in RAS+ millimetres.

Orientation, in the order it is applied:

1. **Reorientation to RAS.** Every volume is permuted and flipped to the closest canonical
   orientation (array axes point to the patient's Right, Anterior, Superior), exactly what
   nibabel's ``as_closest_canonical`` does for NIfTI. DICOM positions are LPS; they are turned
   into RAS (x and y negated) first. A DICOM file without Image Position/Orientation (Patient)
   is taken as axial with orientation (1, 0, 0, 0, 1, 0) and 1 mm spacing, frames in file order.
2. **Slice axis.** ``axial`` cuts along axis 2 (slice 0 is the most inferior), ``coronal`` along
   axis 1 (slice 0 most posterior), ``sagittal`` along axis 0 (slice 0 most left).
3. **Display.** A slice is shown in the radiological convention: for an axial slice, anterior at
   the top and the patient's right on the image's left (the way a standard axial DICOM image is
   stored, so an axial DICOM series gives back each file's pixels); superior at the top for
   coronal and sagittal slices. In array terms: the two remaining axes (p < q) give the image
   ``slab[::-1, ::-1].T`` (rows along q, columns along p, both reversed).

DICOM series are ordered by Image Position (Patient) projected on the slice normal (the cross
product of the two Image Orientation (Patient) direction cosines), never by file name; a 4D
NIfTI file gives its first volume (t = 0). Multi-frame DICOM frames are ordered by their Plane
Position Sequence when the file has one.

Intensities (:class:`Window`, :class:`Percentiles`) map a volume to [0, 1]:

* **CT**: a window (level L, width W, in HU): ``clip((HU - (L - W/2)) / W, 0, 1)``; presets in
  :data:`~embedkit.data.policies.CT_WINDOWS`. DICOM values are HU after Rescale Slope/Intercept;
  NIfTI values after ``scl_slope``/``scl_inter`` (nibabel's ``get_fdata``) are taken as HU.
* **MRI**: per-volume percentiles (default 0.5 and 99.5, over all voxels of the volume):
  ``clip((v - p_low) / (p_high - p_low), 0, 1)``; a constant volume gives zeros.

Reading: :class:`VolumeSlice` is one slice of one volume, a path-like object whose
:meth:`~VolumeSlice.read` returns the slice in [0, 1] (so :func:`embedkit.data.readers.read_image`
and the datasets treat it like an image file). The whole volume is read and rendered once per
process and kept (the last two volumes), since slices of a volume are read one after another.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from embedkit.data.policies import CT_WINDOWS, SliceAxis
from embedkit.errors import ImageNotFoundError, ImageReadError, ManifestError, did_you_mean

__all__ = [
    "SLICE_AXES",
    "VOLUME_FORMATS",
    "Percentiles",
    "Volume",
    "VolumeFormat",
    "VolumeHeader",
    "VolumeSlice",
    "VolumeSpec",
    "Window",
    "canonical",
    "load_volume",
    "read_volume_header",
    "register_volume_format",
    "render_volume",
    "slice_stack",
    "volume_slices",
    "volume_stack",
    "window_preset",
]

#: Slice axis name -> array axis after reorientation to RAS.
SLICE_AXES: dict[str, int] = {"sagittal": 0, "coronal": 1, "axial": 2}


# ---- intensities -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Window:
    """A CT window in Hounsfield units: values in [level - width/2, level + width/2] -> [0, 1]."""

    level: float
    width: float

    def __post_init__(self) -> None:
        if not self.width > 0:
            raise ManifestError(f"Expected a window width > 0 HU, got {self.width} instead")

    def apply(self, values: np.ndarray) -> np.ndarray:
        """``clip((values - (level - width / 2)) / width, 0, 1)`` as float32."""
        out = values.astype(np.float32)  # a copy: the volume is never changed in place
        out -= np.float32(self.level - self.width / 2.0)
        out /= np.float32(self.width)
        np.clip(out, 0.0, 1.0, out=out)
        return out

    def describe(self) -> dict[str, Any]:
        return {"window": {"level": self.level, "width": self.width}}


def window_preset(name: str) -> Window:
    """The named CT window (``lung``, ``abdomen``, ``brain``, ``bone``, ``mediastinum``)."""
    try:
        level, width = CT_WINDOWS[name]
    except KeyError:
        raise ManifestError(
            f"unknown CT window {name!r}{did_you_mean(name, CT_WINDOWS) or '.'} "
            f"Presets: {', '.join(CT_WINDOWS)}; or give level and width in HU"
        ) from None
    return Window(level, width)


@dataclass(frozen=True, slots=True)
class Percentiles:
    """MRI normalisation: the volume's ``low`` and ``high`` percentiles -> 0 and 1."""

    low: float = 0.5
    high: float = 99.5

    def __post_init__(self) -> None:
        if not 0.0 <= self.low < self.high <= 100.0:
            raise ManifestError(
                f"Expected percentiles 0 <= low < high <= 100, got {self.low} and {self.high} "
                "instead"
            )

    def apply(self, values: np.ndarray) -> np.ndarray:
        """``clip((v - p_low) / (p_high - p_low), 0, 1)`` over the whole volume, as float32."""
        low, high = (float(v) for v in np.percentile(values, [self.low, self.high]))
        if not high > low:
            return np.zeros(values.shape, dtype=np.float32)
        out = values.astype(np.float32)  # a copy: the volume is never changed in place
        out -= np.float32(low)
        out /= np.float32(high - low)
        np.clip(out, 0.0, 1.0, out=out)
        return out

    def describe(self) -> dict[str, Any]:
        return {"percentiles": [self.low, self.high]}


@dataclass(frozen=True, slots=True)
class VolumeSpec:
    """How a dataset's volumes become slices: the intensity mapping and the slice axis."""

    intensity: Window | Percentiles
    slice_axis: SliceAxis = "axial"

    def __post_init__(self) -> None:
        if self.slice_axis not in SLICE_AXES:
            raise ManifestError(
                f"Expected slice_axis one of {', '.join(SLICE_AXES)}, got {self.slice_axis!r} "
                "instead"
            )

    def describe(self) -> dict[str, Any]:
        """A JSON-able description (part of the cache key of an extraction)."""
        return {"slice_axis": self.slice_axis, **self.intensity.describe()}


# ---- volumes and their formats -----------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Volume:
    """Modality values (float32) on a voxel grid (I, J, K) and the voxel -> RAS+ mm affine."""

    data: np.ndarray
    affine: np.ndarray


@dataclass(frozen=True, eq=False)
class VolumeHeader:
    """What a volume is without its voxels: grid shape, affine and the files of its third axis.

    ``files`` holds one file per index of array axis 2 for a DICOM series (sorted by position),
    else the one file of the volume.
    """

    shape: tuple[int, int, int]
    affine: np.ndarray
    files: tuple[Path, ...]


@dataclass(frozen=True, slots=True)
class VolumeFormat:
    """One readable volume format: how to recognise a path, read its header and its voxels."""

    name: str
    matches: Callable[[Path], bool]
    header: Callable[[Path], VolumeHeader]
    load: Callable[[Path], Volume]


VOLUME_FORMATS: list[VolumeFormat] = []


def register_volume_format(fmt: VolumeFormat) -> VolumeFormat:
    """Add ``fmt`` to :data:`VOLUME_FORMATS` (checked in order); a duplicate name raises."""
    if any(f.name == fmt.name for f in VOLUME_FORMATS):
        raise ValueError(f"volume format {fmt.name!r} is already registered")
    VOLUME_FORMATS.append(fmt)
    return fmt


def _format_of(path: Path) -> VolumeFormat:
    if not path.exists():
        raise ImageNotFoundError(path, "no such volume file or series folder")
    for fmt in VOLUME_FORMATS:
        if fmt.matches(path):
            return fmt
    raise ImageReadError(
        path,
        "not a volume: expected a NIfTI file (.nii, .nii.gz), a DICOM series folder or a "
        "DICOM file; formats: " + ", ".join(f.name for f in VOLUME_FORMATS),
    )


def read_volume_header(path: str | os.PathLike[str]) -> VolumeHeader:
    """The header of the volume at ``path`` (reads no voxels where the format allows)."""
    path = Path(path)
    return _format_of(path).header(path)


def load_volume(path: str | os.PathLike[str]) -> Volume:
    """The volume at ``path`` as stored (modality values, affine), not yet reoriented."""
    path = Path(path)
    return _format_of(path).load(path)


def _ornt(affine: np.ndarray) -> np.ndarray:
    import nibabel.orientations as nio

    return np.asarray(nio.io_orientation(affine))  # type: ignore[no-untyped-call]


def canonical(volume: Volume) -> Volume:
    """``volume`` permuted and flipped to the closest RAS orientation (as nibabel's
    ``as_closest_canonical``)."""
    import nibabel.orientations as nio

    ornt = _ornt(volume.affine)
    shape = volume.data.shape[:3]
    data = nio.apply_orientation(volume.data, ornt)  # type: ignore[no-untyped-call]
    affine = volume.affine @ nio.inv_ornt_aff(ornt, shape)  # type: ignore[no-untyped-call]
    return Volume(data, affine)  # a view of the voxels when only flips and transposes


def slice_stack(data: np.ndarray, slice_axis: SliceAxis) -> np.ndarray:
    """The (n, H, W) slices of a RAS-oriented ``data`` along ``slice_axis``, in display
    orientation (see the module docstring); a view of ``data``."""
    moved = np.moveaxis(data, SLICE_AXES[slice_axis], 0)
    stack: np.ndarray = moved[:, ::-1, ::-1].transpose(0, 2, 1)
    return stack


def volume_slices(header: VolumeHeader, slice_axis: SliceAxis) -> tuple[int, tuple[Path, ...]]:
    """How many slices the volume has along ``slice_axis`` and the file holding each slice.

    A slice maps to one file of a DICOM series when the series is stacked along that axis;
    otherwise (a single file, or a series cut across its stacking axis) the first file stands
    for every slice.
    """
    ornt = _ornt(header.affine)
    target = SLICE_AXES[slice_axis]
    source = int(np.flatnonzero(ornt[:, 0] == target)[0])
    n = header.shape[source]
    if len(header.files) == n and source == 2:
        files = header.files if ornt[2, 1] > 0 else header.files[::-1]
        return n, tuple(files)
    return n, (header.files[0],) * n


def volume_stack(path: str | os.PathLike[str], slice_axis: SliceAxis = "axial") -> np.ndarray:
    """The volume's values as stored (no intensity mapping) as (n, H, W) slices, reoriented and
    displayed exactly as :func:`render_volume` does: for label maps that must line up with the
    slices (segmentation masks on the image grid)."""
    return slice_stack(canonical(load_volume(path)).data, slice_axis)


@functools.lru_cache(maxsize=2)
def _rendered(path: str, stamp: tuple[int, int], spec: VolumeSpec) -> np.ndarray:
    volume = canonical(load_volume(path))
    return slice_stack(spec.intensity.apply(volume.data), spec.slice_axis)


def render_volume(path: str | os.PathLike[str], spec: VolumeSpec) -> np.ndarray:
    """All slices of the volume at ``path`` as float32 (n, H, W) in [0, 1] (cached per process
    for the last two volumes, keyed by path, modification time and size)."""
    path = Path(path)
    try:
        stat = path.stat()
    except FileNotFoundError as exc:
        raise ImageNotFoundError(path, "no such volume file or series folder") from exc
    return _rendered(os.fspath(path), (stat.st_mtime_ns, stat.st_size), spec)


@dataclass(frozen=True, slots=True)
class VolumeSlice(os.PathLike[str]):
    """Slice ``index`` of the volume at ``volume``, read with ``spec``.

    Path-like: ``os.fspath`` gives ``file``, the file that holds the slice (its size enters the
    cache key's content fingerprint, and a missing file is reported like a missing image).
    """

    volume: str
    index: int
    spec: VolumeSpec
    file: str

    def __fspath__(self) -> str:
        return self.file

    def __str__(self) -> str:
        return f"{self.volume}#{self.index}"

    def read(self) -> np.ndarray:
        """The slice as float32 (H, W) in [0, 1]."""
        stack = render_volume(self.volume, self.spec)
        if not 0 <= self.index < len(stack):
            raise ImageReadError(
                self.volume,
                f"slice {self.index} does not exist; the volume has {len(stack)} slices along "
                f"{self.spec.slice_axis} (was it replaced after the manifest was read?)",
            )
        return np.ascontiguousarray(stack[self.index])


# ---- NIfTI -------------------------------------------------------------------------------------


def _is_nifti(path: Path) -> bool:
    return path.is_file() and path.name.lower().endswith((".nii", ".nii.gz"))


def _nifti_image(path: Path) -> Any:
    import nibabel as nib

    try:
        return nib.load(path)
    except FileNotFoundError as exc:
        raise ImageNotFoundError(path, "no such file") from exc
    except Exception as exc:
        raise ImageReadError(path, f"not a readable NIfTI file: {exc}") from exc


def _spatial_shape(path: Path, shape: tuple[int, ...]) -> tuple[int, int, int]:
    if len(shape) < 3 or len(shape) > 4:
        raise ImageReadError(path, f"expected a 3D or 4D NIfTI volume, got shape {shape}")
    return (int(shape[0]), int(shape[1]), int(shape[2]))


def _nifti_header(path: Path) -> VolumeHeader:
    image = _nifti_image(path)
    shape = _spatial_shape(path, tuple(image.shape))
    return VolumeHeader(shape, np.asarray(image.affine, dtype=np.float64), (path,))


def _nifti_load(path: Path) -> Volume:
    image = _nifti_image(path)
    _spatial_shape(path, tuple(image.shape))
    try:
        proxy = image.dataobj
        raw = proxy[..., 0] if len(image.shape) == 4 else proxy[...]
        scaled = np.asarray(raw, dtype=np.float32)
    except Exception as exc:
        raise ImageReadError(path, f"could not read the NIfTI voxels (truncated?): {exc}") from exc
    return Volume(scaled, np.asarray(image.affine, dtype=np.float64))


# ---- DICOM -------------------------------------------------------------------------------------

_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def _floats(value: object, n: int) -> np.ndarray | None:
    if value is None:
        return None
    try:
        out = np.asarray([float(v) for v in value], dtype=np.float64)  # type: ignore[attr-defined]
    except (TypeError, ValueError):
        return None
    return out if out.shape == (n,) else None


def _group_value(ds: Any, sequence: str, keyword: str, frame: int | None = None) -> object:
    """``keyword`` from the per-frame (if ``frame``) or shared functional group ``sequence``."""
    for groups, index in (
        ("PerFrameFunctionalGroupsSequence", frame),
        ("SharedFunctionalGroupsSequence", 0),
    ):
        items = ds.get(groups)
        if not items or index is None:
            continue
        inner = items[index].get(sequence)
        if inner and keyword in inner[0]:
            return inner[0].get(keyword)
    return None


def _orientation(ds: Any, frame: int | None = None) -> np.ndarray:
    value = ds.get("ImageOrientationPatient") or _group_value(
        ds, "PlaneOrientationSequence", "ImageOrientationPatient", frame
    )
    iop = _floats(value, 6)
    return np.array([1.0, 0.0, 0.0, 0.0, 1.0, 0.0]) if iop is None else iop


def _spacing(ds: Any) -> np.ndarray:
    value = ds.get("PixelSpacing") or _group_value(ds, "PixelMeasuresSequence", "PixelSpacing", 0)
    spacing = _floats(value, 2)
    return np.array([1.0, 1.0]) if spacing is None else spacing


def _affine(iop: np.ndarray, spacing: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """RAS affine of a stack (I = columns, J = rows, K = slices) from LPS geometry; ``positions``
    are the sorted slice positions (K, 3)."""
    row_dir, col_dir = iop[:3], iop[3:]
    normal = np.cross(row_dir, col_dir)
    n = len(positions)
    step = (positions[-1] - positions[0]) / (n - 1) if n > 1 else normal
    lps = np.eye(4)
    lps[:3, 0] = row_dir * spacing[1]  # along a row: the column index grows (PixelSpacing[1])
    lps[:3, 1] = col_dir * spacing[0]  # down a column: the row index grows (PixelSpacing[0])
    lps[:3, 2] = step
    lps[:3, 3] = positions[0]
    return _LPS_TO_RAS @ lps


def _order(
    where: Path, positions: list[np.ndarray | None], iop: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(order, sorted positions): slices sorted by position along the normal; without positions,
    file order at 1 mm steps."""
    n = len(positions)
    if any(p is None for p in positions):
        return np.arange(n), np.array([[0.0, 0.0, float(k)] for k in range(n)])
    stacked = np.stack([p for p in positions if p is not None])
    distance = stacked @ np.cross(iop[:3], iop[3:])
    order = np.argsort(distance, kind="stable")
    if n > 1 and np.any(np.diff(distance[order]) <= 1e-6):
        raise ImageReadError(
            where,
            "two slices share a position along the slice normal; a series folder must hold "
            "one series (one file per slice position)",
        )
    return order, stacked[order]


def _series_files(folder: Path) -> list[Path]:
    """The slice files of a series folder: every file but hidden ones and a DICOMDIR."""
    return sorted(
        p
        for p in folder.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.name.upper() != "DICOMDIR"
    )


def _series_header(folder: Path) -> tuple[VolumeHeader, np.ndarray]:
    from embedkit.data.dicom import read_dicom_header

    files = _series_files(folder)
    if not files:
        raise ImageReadError(folder, "the DICOM series folder is empty")
    headers = [read_dicom_header(f) for f in files]
    iop = _orientation(headers[0])
    uids = {str(h.get("SeriesInstanceUID", "")) for h in headers}
    if len(uids) > 1:
        raise ImageReadError(
            folder, f"holds {len(uids)} series (SeriesInstanceUID); keep one series per folder"
        )
    positions = [_floats(h.get("ImagePositionPatient"), 3) for h in headers]
    order, sorted_positions = _order(folder, positions, iop)
    rows, cols = int(headers[0].Rows), int(headers[0].Columns)
    odd = [
        f.name for f, h in zip(files, headers, strict=True) if (h.Rows, h.Columns) != (rows, cols)
    ]
    if odd:
        raise ImageReadError(folder, f"slices differ in size ({', '.join(odd[:3])} ...)")
    affine = _affine(iop, _spacing(headers[0]), sorted_positions)
    ordered = tuple(files[i] for i in order)
    return VolumeHeader((cols, rows, len(files)), affine, ordered), order


def _series_load(folder: Path) -> Volume:
    from embedkit.data.dicom import read_frames_modality_values

    header, _ = _series_header(folder)
    frames = [read_frames_modality_values(f)[1][0].astype(np.float32) for f in header.files]
    data = np.stack(frames, axis=-1).transpose(1, 0, 2)  # (rows, cols, K) -> (I, J, K)
    return Volume(data, header.affine)


def _multiframe_geometry(path: Path, ds: Any) -> tuple[VolumeHeader, np.ndarray]:
    n = int(ds.get("NumberOfFrames", 1) or 1)
    iop = _orientation(ds, 0)
    if n == 1:
        positions = [_floats(ds.get("ImagePositionPatient"), 3)]
    else:
        positions = [
            _floats(_group_value(ds, "PlanePositionSequence", "ImagePositionPatient", i), 3)
            for i in range(n)
        ]
    order, sorted_positions = _order(path, positions, iop)
    affine = _affine(iop, _spacing(ds), sorted_positions)
    return VolumeHeader((int(ds.Columns), int(ds.Rows), n), affine, (path,)), order


def _multiframe_header(path: Path) -> VolumeHeader:
    from embedkit.data.dicom import read_dicom_header

    return _multiframe_geometry(path, read_dicom_header(path))[0]


def _multiframe_load(path: Path) -> Volume:
    from embedkit.data.dicom import read_frames_modality_values

    ds, frames = read_frames_modality_values(path)
    header, order = _multiframe_geometry(path, ds)
    return Volume(frames[order].astype(np.float32).transpose(2, 1, 0), header.affine)


def _is_dicom_file(path: Path) -> bool:
    if not path.is_file():
        return False
    with path.open("rb") as f:
        head = f.read(132)
    return head[128:132] == b"DICM" or path.suffix.lower() in (".dcm", ".dicom")


def _builtin_formats() -> Iterable[VolumeFormat]:
    yield VolumeFormat("NIfTI", _is_nifti, _nifti_header, _nifti_load)
    yield VolumeFormat("DICOM series", Path.is_dir, lambda p: _series_header(p)[0], _series_load)
    yield VolumeFormat("DICOM file", _is_dicom_file, _multiframe_header, _multiframe_load)


for _fmt in _builtin_formats():
    register_volume_format(_fmt)
