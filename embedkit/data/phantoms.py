"""Small CT-like and MR-like phantom volumes with organ label maps, and a manifest for them.

Each phantom is an elliptic body in air with a fat rim, soft tissue, a spine (bone), a liver, a
spleen, two kidneys and, in some volumes, small lesions in the liver (two to three voxels across:
resolvable at high resolution only). Values:

* CT, in Hounsfield units: air -1000, fat -100, soft tissue 40, liver 60, spleen 45, kidney
  cortex 150 (contrast-enhanced), lesion 110, bone 700, plus Gaussian noise (sd 8 HU); stored as
  int16 NIfTI, or as a DICOM series (uint16 with Rescale Intercept -1024, Slope 1); values
  below -1024 HU are clipped to it, as scanners do.
* MR (T1-like, arbitrary units >= 0): air 0, fat 900, soft tissue 400, liver 520, spleen 330,
  kidney 300, lesion 200, bone 150, times a smooth bias field, plus Rician-like noise.

Label maps (uint8 NIfTI on the same grid) hold :data:`CLASSES` (value i is ``CLASSES[i]``);
``body`` is the whole body outline (its fat rim and the soft tissue around the organs).
Volume-level labels: ``liver_enlarged`` (the liver is 35% larger along each axis) and
``has_lesion``. Every volume is seeded by ``(seed, volume number)``, so volume i is the same
whatever the number of volumes written. Volumes are stored in RAS orientation (the affine is
diagonal with the voxel spacing), so they need no reorientation.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

__all__ = [
    "CLASSES",
    "CT_HU",
    "Modality",
    "Phantom",
    "make_phantom",
    "write_dicom_series",
    "write_phantom_dataset",
]

Modality = Literal["ct", "mr"]

#: Label-map classes; value i of a label map is ``CLASSES[i]``.
CLASSES: tuple[str, ...] = ("background", "body", "liver", "spleen", "kidney", "bone", "lesion")

#: CT values per class in HU (``body`` is soft tissue; fat and air are not classes).
CT_HU: dict[str, float] = {
    "air": -1000.0,
    "fat": -100.0,
    "body": 40.0,
    "liver": 60.0,
    "spleen": 45.0,
    "kidney": 150.0,
    "bone": 700.0,
    "lesion": 110.0,
}
_MR: dict[str, float] = {
    "air": 0.0,
    "fat": 900.0,
    "body": 400.0,
    "liver": 520.0,
    "spleen": 330.0,
    "kidney": 300.0,
    "bone": 150.0,
    "lesion": 200.0,
}


@dataclass(frozen=True, eq=False)
class Phantom:
    """One phantom: ``values`` (X, Y, Z) float32 (HU or MR units), ``labels`` uint8 label map,
    ``affine`` voxel -> RAS mm, and its volume-level labels."""

    values: np.ndarray
    labels: np.ndarray
    affine: np.ndarray
    liver_enlarged: bool
    has_lesion: bool


def _ellipsoid(
    grid: tuple[np.ndarray, ...], centre: Sequence[float], radii: Sequence[float]
) -> np.ndarray:
    total = np.zeros(grid[0].shape)
    for g, c, r in zip(grid, centre, radii, strict=True):
        total += ((g - c) / r) ** 2
    inside: np.ndarray = total <= 1.0
    return inside


def make_phantom(
    index: int,
    *,
    modality: Modality = "ct",
    shape: tuple[int, int, int] = (64, 64, 16),
    spacing: tuple[float, float, float] = (6.0, 6.0, 10.0),
    seed: int = 0,
    liver_enlarged: bool | None = None,
    has_lesion: bool | None = None,
) -> Phantom:
    """Phantom number ``index`` (seeded by ``(seed, index)``); labels drawn at random unless
    given. ``shape`` is (X, Y, Z) voxels (R, A, S), ``spacing`` their size in mm."""
    if modality not in ("ct", "mr"):
        raise ValueError(f"Expected modality 'ct' or 'mr', got {modality!r} instead")
    if min(shape) < 4:
        raise ValueError(f"Expected a shape of at least 4 voxels per axis, got {shape} instead")
    rng = np.random.default_rng([seed, index])
    enlarged = bool(rng.random() < 0.5) if liver_enlarged is None else liver_enlarged
    lesion = bool(rng.random() < 0.5) if has_lesion is None else has_lesion
    X, Y, Z = shape
    # Coordinates in units of the body's half-size: x from right (-) to left (+) of the image.
    grid = np.meshgrid(
        np.linspace(-1, 1, X), np.linspace(-1, 1, Y), np.linspace(-1, 1, Z), indexing="ij"
    )
    jitter = rng.normal(0.0, 0.03, size=8)
    labels = np.zeros(shape, dtype=np.uint8)
    body = _ellipsoid(grid, (0, 0, 0), (0.92 + jitter[0], 0.7 + jitter[1], 1.6))
    inner = _ellipsoid(grid, (0, 0, 0), (0.84 + jitter[0], 0.62 + jitter[1], 1.6))
    labels[body] = CLASSES.index("body")
    scale = 1.35 if enlarged else 1.0
    # RAS: the patient's right (liver) has smaller x; anterior has larger y.
    liver = _ellipsoid(
        grid, (-0.38 + jitter[2], 0.1, 0.15), (0.3 * scale, 0.3 * scale, 0.75 * scale)
    )
    spleen = _ellipsoid(grid, (0.5 + jitter[3], -0.05, 0.3), (0.14, 0.16, 0.35))
    kidneys = _ellipsoid(grid, (-0.32, -0.32, -0.2), (0.1, 0.1, 0.3)) | _ellipsoid(
        grid, (0.32 + jitter[4], -0.32, -0.2), (0.1, 0.1, 0.3)
    )
    bone = _ellipsoid(grid, (0.0, -0.45, 0.0), (0.09, 0.09, 1.6))
    for name, region in (("liver", liver), ("spleen", spleen), ("kidney", kidneys), ("bone", bone)):
        labels[region & inner] = CLASSES.index(name)
    if lesion:
        liver_voxels = np.argwhere(labels == CLASSES.index("liver"))
        for centre in liver_voxels[rng.choice(len(liver_voxels), size=3, replace=False)]:
            radius = np.array([1.2, 1.2, 0.8])  # in voxels
            idx = np.indices(shape).reshape(3, -1).T
            near = (((idx - centre) / radius) ** 2).sum(axis=1) <= 1.0
            spot = near.reshape(shape) & (labels == CLASSES.index("liver"))
            labels[spot] = CLASSES.index("lesion")
    table = CT_HU if modality == "ct" else _MR
    values = np.full(shape, table["air"], dtype=np.float32)
    values[body] = table["fat"]  # the rim of the body class is fat, its inside soft tissue
    values[inner] = table["body"]
    for i, name in enumerate(CLASSES[2:], start=2):
        values[labels == i] = table[name]
    if modality == "ct":
        values += rng.normal(0.0, 8.0, size=shape).astype(np.float32)
        np.maximum(values, -1024.0, out=values)  # the floor of CT (and of the DICOM variant)
    else:
        bias = 1.0 + 0.15 * grid[0] - 0.1 * grid[1] + 0.05 * grid[2]
        noise = rng.normal(0.0, 20.0, size=(2, *shape))
        values = np.hypot(values * bias + noise[0], noise[1]).astype(np.float32)
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = [-(n - 1) * s / 2 for n, s in zip(shape, spacing, strict=True)]
    return Phantom(values, labels, affine, enlarged, lesion)


def _write_nifti(path: Path, data: np.ndarray, affine: np.ndarray) -> None:
    import nibabel as nib

    image = nib.Nifti1Image(data, affine)  # type: ignore[no-untyped-call]
    image.header.set_xyzt_units("mm")  # type: ignore[no-untyped-call]
    nib.save(image, path)


def write_dicom_series(
    phantom: Phantom, folder: str | os.PathLike[str], *, seed: int = 0
) -> list[Path]:
    """Write a CT phantom as an axial DICOM series, one file per slice, under random file names
    (so readers must order slices by position). The geometry matches the phantom's affine.
    Returns the files in slice order (inferior to superior)."""
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    X, Y, Z = phantom.values.shape
    rng = np.random.default_rng([seed, 7])
    names = rng.permutation(Z)
    series, study = generate_uid(), generate_uid()
    spacing = np.abs(np.diag(phantom.affine)[:3])
    stored = np.clip(np.rint(phantom.values) + 1024, 0, 65535).astype(np.uint16)
    files = []
    for k in range(Z):
        # Pixel (row r, col c) is voxel (X-1-c, Y-1-r, k): radiological display of an axial slice.
        pixels = stored[::-1, ::-1, k].T
        corner = phantom.affine @ np.array([X - 1, Y - 1, k, 1.0])
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.Modality = "CT"
        ds.PatientID = "phantom"
        ds.InstanceNumber = int(names[k]) + 1  # deliberately not the slice order
        ds.ImagePositionPatient = [float(-corner[0]), float(-corner[1]), float(corner[2])]
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        ds.PixelSpacing = [float(spacing[1]), float(spacing[0])]
        ds.SliceThickness = float(spacing[2])
        ds.Rows, ds.Columns = int(pixels.shape[0]), int(pixels.shape[1])
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
        ds.PixelRepresentation = 0
        ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
        ds.PixelData = np.ascontiguousarray(pixels).tobytes()
        path = folder / f"IM{int(names[k]):04d}.dcm"
        pydicom.dcmwrite(path, ds, enforce_file_format=True)
        files.append(path)
    return files


_SPLIT_OF_BLOCK = ("train", "val", "test", "train")


def write_phantom_dataset(
    folder: str | os.PathLike[str],
    *,
    n_volumes: int = 12,
    modality: Modality = "ct",
    dicom: bool = False,
    shape: tuple[int, int, int] = (64, 64, 16),
    seed: int = 0,
    name: str | None = None,
    window: str = "abdomen",
) -> Path:
    """Write ``n_volumes`` phantoms, their label maps, an index and a manifest under ``folder``.

    Volumes are ``volumes/<id>.nii.gz`` (or, with ``dicom`` for CT, series folders
    ``volumes/<id>/``), label maps ``masks/<id>.nii.gz``; ``index.csv`` has the columns
    ``volume_id, path, mask, patient, liver_enlarged, has_lesion, split``; ``data_manifest.yaml``
    holds one dataset (``name``, default ``phantom-<modality>``) with the ``volumes:`` block, the
    ``classes:`` of the label maps, multi-label columns and the given split (one patient per
    volume). Each run of four volumes holds the four label combinations and goes to one split
    (train, val, test, train, ...), so every split has both classes of both labels.
    Returns the manifest path.
    """
    if dicom and modality != "ct":
        raise ValueError("the DICOM series variant is written for CT phantoms only")
    if n_volumes < 12:
        raise ValueError(f"Expected n_volumes >= 12 (four per split), got {n_volumes} instead")
    root = Path(folder)
    (root / "volumes").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n_volumes):
        volume_id = f"{modality}{i:03d}"
        phantom = make_phantom(
            i,
            modality=modality,
            shape=shape,
            seed=seed,
            liver_enlarged=i % 2 == 1,
            has_lesion=(i // 2) % 2 == 1,
        )
        if dicom:
            write_dicom_series(phantom, root / "volumes" / volume_id, seed=seed + i)
            path = f"volumes/{volume_id}"
        else:
            data = np.rint(phantom.values).astype(np.int16) if modality == "ct" else phantom.values
            _write_nifti(root / "volumes" / f"{volume_id}.nii.gz", data, phantom.affine)
            path = f"volumes/{volume_id}.nii.gz"
        _write_nifti(root / "masks" / f"{volume_id}.nii.gz", phantom.labels, phantom.affine)
        rows.append(
            {
                "volume_id": volume_id,
                "path": path,
                "mask": f"masks/{volume_id}.nii.gz",
                "patient": f"p{i:03d}",
                "liver_enlarged": int(phantom.liver_enlarged),
                "has_lesion": int(phantom.has_lesion),
                "split": _SPLIT_OF_BLOCK[(i // 4) % 4],
            }
        )
    with (root / "index.csv").open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    intensity = f"window: {window}" if modality == "ct" else "percentiles: [0.5, 99.5]"
    manifest = root / "data_manifest.yaml"
    manifest.write_text(
        f"""cache: ./cache
datasets:
  {name or f"phantom-{modality}"}:
    images: .
    index: index.csv
    id_column: volume_id
    path_column: path
    patient_column: patient
    volumes:
      modality: {modality}
      {intensity}
      slice_axis: axial
    classes: [{", ".join(CLASSES)}]
    labels:
      format: columns
      columns: [liver_enlarged, has_lesion]
    splits:
      method: given
      column: split
""",
        encoding="utf-8",
    )
    return manifest
