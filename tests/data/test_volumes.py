"""Volumes on real files that pydicom, pydicom-data and nibabel ship: HU, windows, percentiles and
orientation, each compared with values computed here directly with pydicom / nibabel."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file

from embedkit.data.policies import CT_WINDOWS
from embedkit.data.readers import read_image
from embedkit.data.volumes import (
    Percentiles,
    VolumeSlice,
    VolumeSpec,
    Window,
    read_volume_header,
    render_volume,
    volume_slices,
    window_preset,
)
from embedkit.errors import ImageNotFoundError, ImageReadError, ManifestError

NIBABEL_DATA = Path(nib.__file__).parent / "tests" / "data"


def _testfile(name: str) -> str:
    path = get_testdata_file(name)
    assert isinstance(path, str), f"pydicom test file {name} is not installed"
    return path


def _window(hu: np.ndarray, level: float, width: float) -> np.ndarray:
    return np.clip((hu - (level - width / 2)) / width, 0, 1)


def _display(canonical: np.ndarray, axis: int) -> np.ndarray:
    """Independent statement of the display rule: take the slab, reverse both axes, transpose."""
    return np.stack(
        [np.take(canonical, k, axis=axis)[::-1, ::-1].T for k in range(canonical.shape[axis])]
    )


@pytest.mark.parametrize("preset", sorted(CT_WINDOWS))
def test_ct_small_hounsfield_units_through_each_preset(preset: str) -> None:
    path = _testfile("CT_small.dcm")
    ds = pydicom.dcmread(path)
    hu = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    level, width = CT_WINDOWS[preset]
    got = render_volume(path, VolumeSpec(window_preset(preset)))
    assert got.shape == (1, 128, 128) and got.dtype == np.float32
    np.testing.assert_allclose(got[0], _window(hu, level, width), atol=1e-6)


def test_window_presets_are_the_cited_values() -> None:
    assert dict(CT_WINDOWS) == {
        "brain": (40, 80),
        "lung": (-600, 1500),
        "mediastinum": (50, 350),
        "abdomen": (50, 400),
        "bone": (400, 1800),
    }
    explicit = render_volume(_testfile("CT_small.dcm"), VolumeSpec(Window(-200.0, 900.0)))
    ds = pydicom.dcmread(_testfile("CT_small.dcm"))
    hu = ds.pixel_array * 1.0 - 1024.0  # slope 1, intercept -1024 in this file
    np.testing.assert_allclose(explicit[0], _window(hu, -200, 900), atol=1e-6)


def test_unknown_window_suggests_the_preset() -> None:
    with pytest.raises(ManifestError, match="did you mean 'lung'"):
        window_preset("lungs")
    with pytest.raises(ManifestError, match="width > 0"):
        Window(40, 0)
    with pytest.raises(ManifestError, match="low < high"):
        Percentiles(99.5, 0.5)


def test_mr_small_percentile_normalisation() -> None:
    path = _testfile("MR_small.dcm")
    values = pydicom.dcmread(path).pixel_array.astype(np.float64)  # no rescale in this file
    low, high = np.percentile(values, [1.0, 99.0])
    got = render_volume(path, VolumeSpec(Percentiles(1.0, 99.0)))[0]
    np.testing.assert_allclose(got, np.clip((values - low) / (high - low), 0, 1), atol=1e-6)


def test_multiframe_mr_without_geometry_keeps_frame_order_and_pixels() -> None:
    path = _testfile("emri_small.dcm")
    frames = pydicom.dcmread(path).pixel_array.astype(np.float64)
    assert frames.shape == (10, 64, 64)
    low, high = np.percentile(frames, [0.5, 99.5])  # over the whole volume, not per frame
    got = render_volume(path, VolumeSpec(Percentiles()))
    np.testing.assert_allclose(got, np.clip((frames - low) / (high - low), 0, 1), atol=1e-6)
    header = read_volume_header(path)
    assert volume_slices(header, "axial") == (10, (Path(path),) * 10)


def test_enhanced_ct_frames_by_position_with_shared_rescale_and_flipped_rows() -> None:
    path = _testfile("eCT_Supplemental.dcm")
    ds = pydicom.dcmread(path)
    transform = ds.SharedFunctionalGroupsSequence[0].PixelValueTransformationSequence[0]
    hu = ds.pixel_array * float(transform.RescaleSlope) + float(transform.RescaleIntercept)
    z = [
        float(f.PlanePositionSequence[0].ImagePositionPatient[2])
        for f in ds.PerFrameFunctionalGroupsSequence
    ]
    orientation = [
        float(v)
        for v in ds.SharedFunctionalGroupsSequence[0]
        .PlaneOrientationSequence[0]
        .ImageOrientationPatient
    ]
    assert orientation == [-1, 0, 0, 0, 1, 0]  # rows run to the patient's right
    # Radiological display wants the patient's right on the image's left: columns reversed.
    expected = np.stack([_window(hu[i], 50, 400)[:, ::-1] for i in np.argsort(z)])
    got = render_volume(path, VolumeSpec(window_preset("abdomen")))
    np.testing.assert_allclose(got, expected, atol=1e-6)


def test_nifti_is_reoriented_to_ras_and_cut_along_each_axis() -> None:
    path = NIBABEL_DATA / "anatomical.nii"
    canonical = np.asarray(nib.as_closest_canonical(nib.load(path)).get_fdata())
    low, high = np.percentile(canonical, [0.5, 99.5])
    scaled = np.clip((canonical - low) / (high - low), 0, 1)
    for name, axis in (("sagittal", 0), ("coronal", 1), ("axial", 2)):
        got = render_volume(path, VolumeSpec(Percentiles(), name))  # type: ignore[arg-type]
        np.testing.assert_allclose(got, _display(scaled, axis), atol=1e-6)
        assert volume_slices(read_volume_header(path), name)[0] == canonical.shape[axis]  # type: ignore[arg-type]


def test_a_reoriented_copy_renders_the_same_slices(tmp_path: Path) -> None:
    image: Any = nib.load(NIBABEL_DATA / "anatomical.nii")
    # The same anatomy stored with axes permuted and flipped (I, L, P): reorientation undoes it.
    target = nib.orientations.axcodes2ornt(("I", "L", "P"))
    current = nib.orientations.io_orientation(image.affine)
    moved = image.as_reoriented(nib.orientations.ornt_transform(current, target))
    assert nib.aff2axcodes(moved.affine) == ("I", "L", "P")
    nib.save(moved, tmp_path / "ilp.nii.gz")
    spec = VolumeSpec(Percentiles(), "coronal")
    np.testing.assert_array_equal(
        render_volume(tmp_path / "ilp.nii.gz", spec),
        render_volume(NIBABEL_DATA / "anatomical.nii", spec),
    )


def test_4d_nifti_gives_its_first_volume() -> None:
    path = NIBABEL_DATA / "example4d.nii.gz"
    image = nib.as_closest_canonical(nib.load(path))
    first = np.asarray(image.get_fdata())[..., 0]
    low, high = np.percentile(first, [0.5, 99.5])
    expected = _display(np.clip((first - low) / (high - low), 0, 1), 2)
    np.testing.assert_allclose(render_volume(path, VolumeSpec(Percentiles())), expected, atol=1e-6)


def _ct_series(
    folder: Path,
    z_positions: list[float],
    names: list[str],
    orientation: tuple[float, ...] = (1, 0, 0, 0, 1, 0),
) -> np.ndarray:
    """Copies of CT_small at the given z, each with a distinct offset; returns HU by z order."""
    folder.mkdir()
    source = pydicom.dcmread(_testfile("CT_small.dcm"))
    base = source.pixel_array.astype(np.int32)
    hu = {}
    for k, (z, name) in enumerate(zip(z_positions, names, strict=True)):
        ds = source.copy()
        stored = np.clip(base + 40 * k, 0, 32767).astype(source.pixel_array.dtype)
        ds.PixelData = stored.tobytes()
        ds.ImagePositionPatient = [-158.135803, -179.035797, z]
        ds.ImageOrientationPatient = list(orientation)
        ds.InstanceNumber = len(names) - k
        ds.save_as(folder / name)
        hu[z] = stored * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    return np.stack([hu[z] for z in sorted(hu)])


def test_dicom_series_is_ordered_by_position_not_by_name(tmp_path: Path) -> None:
    z = [12.5, -7.5, 2.5, 22.5, -2.5]
    names = ["a.dcm", "b.dcm", "c.dcm", "d.dcm", "e.dcm"]
    expected = _ct_series(tmp_path / "series", z, names)
    got = render_volume(tmp_path / "series", VolumeSpec(window_preset("bone")))
    np.testing.assert_allclose(got, _window(expected, 400, 1800), atol=1e-6)
    n, files = volume_slices(read_volume_header(tmp_path / "series"), "axial")
    by_z = [names[i] for i in np.argsort(z)]
    assert n == 5 and [f.name for f in files] == by_z
    # A slice of the series reads like an image and names its own file.
    source = VolumeSlice(
        str(tmp_path / "series"), 3, VolumeSpec(window_preset("bone")), str(files[3])
    )
    assert os.fspath(source) == str(files[3])
    np.testing.assert_array_equal(read_image(source), got[3])


def test_series_with_two_slices_at_one_position_is_refused(tmp_path: Path) -> None:
    _ct_series(tmp_path / "series", [0.0, 5.0, 5.0], ["a", "b", "c"])
    with pytest.raises(ImageReadError, match="share a position"):
        read_volume_header(tmp_path / "series")


def test_bad_volumes_raise_image_errors(tmp_path: Path) -> None:
    flat = tmp_path / "flat.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((4, 4), np.float32), np.eye(4)), flat)
    with pytest.raises(ImageReadError, match="3D or 4D"):
        read_volume_header(flat)
    with pytest.raises(ImageNotFoundError):
        read_volume_header(tmp_path / "missing.nii.gz")
    (tmp_path / "x.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    with pytest.raises(ImageReadError, match="not a volume"):
        read_volume_header(tmp_path / "x.png")
    (tmp_path / "broken.nii.gz").write_bytes(b"not gzip")
    with pytest.raises(ImageReadError, match="NIfTI"):
        render_volume(tmp_path / "broken.nii.gz", VolumeSpec(Percentiles()))


def test_a_slice_survives_pickling_for_loader_workers() -> None:
    import pickle

    path = _testfile("emri_small.dcm")
    source = VolumeSlice(path, 4, VolumeSpec(Percentiles(2.0, 98.0), "axial"), path)
    copy = pickle.loads(pickle.dumps(source))
    assert copy == source and copy.spec.intensity == Percentiles(2.0, 98.0)
    np.testing.assert_array_equal(read_image(copy), read_image(source))
    with pytest.raises(ImageReadError, match="slice 10 does not exist; the volume has 10"):
        VolumeSlice(path, 10, source.spec, path).read()


def test_series_with_a_flipped_normal_is_ordered_and_shown_from_below(tmp_path: Path) -> None:
    # Columns run anterior (-y in LPS): the normal points inferior, so sorting along the normal
    # gives superior first; reorientation puts inferior first and anterior at the top.
    z = [0.0, 10.0, 5.0]
    expected = _ct_series(tmp_path / "s", z, ["a", "b", "c"], orientation=(1, 0, 0, 0, -1, 0))
    got = render_volume(tmp_path / "s", VolumeSpec(window_preset("abdomen")))
    np.testing.assert_allclose(got, _window(expected, 50, 400)[:, ::-1, :], atol=1e-6)
    _, files = volume_slices(read_volume_header(tmp_path / "s"), "axial")
    assert [f.name for f in files] == ["a", "c", "b"]  # inferior to superior
