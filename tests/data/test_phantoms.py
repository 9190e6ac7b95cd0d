"""Phantom CT / MR volumes: seeded, the documented values per organ, labels that mean what they
say, and a DICOM series that reads back as the same volume as the NIfTI file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pydicom
import pytest

from embedkit.data.phantoms import (
    CLASSES,
    CT_HU,
    Modality,
    make_phantom,
    write_dicom_series,
    write_phantom_dataset,
)
from embedkit.data.volumes import (
    VolumeSpec,
    Window,
    canonical,
    load_volume,
    render_volume,
    volume_stack,
    window_preset,
)


def test_phantoms_are_seeded_per_volume() -> None:
    a, b = make_phantom(3, seed=1), make_phantom(3, seed=1)
    np.testing.assert_array_equal(a.values, b.values)
    np.testing.assert_array_equal(a.labels, b.labels)
    assert not np.array_equal(a.values, make_phantom(4, seed=1).values)
    assert not np.array_equal(a.values, make_phantom(3, seed=2).values)


def test_ct_values_per_class_are_the_documented_hounsfield_units() -> None:
    phantom = make_phantom(0, has_lesion=True, shape=(96, 96, 24))
    for i, name in enumerate(CLASSES[2:], start=2):
        region = phantom.values[phantom.labels == i]
        assert region.size > 0, name
        # noise sd 8 HU: the median is within 2 HU of the class value
        assert abs(float(np.median(region)) - CT_HU[name]) < 2.0, name
    body = phantom.values[phantom.labels == CLASSES.index("body")]
    soft, fat = body[body > -30], body[body <= -30]  # 70 HU apart: 8.75 noise sd
    assert abs(float(np.median(soft)) - CT_HU["body"]) < 2.0
    assert abs(float(np.median(fat)) - CT_HU["fat"]) < 2.0 and 0.05 < fat.size / body.size < 0.5
    outside = phantom.values[phantom.labels == 0]
    assert abs(float(np.median(outside)) - CT_HU["air"]) < 2.0 and outside.max() < -900


def test_labels_mean_what_they_say() -> None:
    small = make_phantom(0, liver_enlarged=False, has_lesion=False)
    large = make_phantom(0, liver_enlarged=True, has_lesion=True)
    liver, lesion = CLASSES.index("liver"), CLASSES.index("lesion")
    assert not (small.labels == lesion).any()
    n_lesion = int((large.labels == lesion).sum())
    assert 0 < n_lesion < 60  # a few voxels: resolvable at high resolution only
    grown = int(((large.labels == liver) | (large.labels == lesion)).sum())
    assert grown > 1.8 * int((small.labels == liver).sum())  # 1.35^3 = 2.46 before clipping
    spleen = int((small.labels == CLASSES.index("spleen")).sum())
    assert n_lesion < spleen < int((small.labels == liver).sum())  # organs of different sizes


def test_mr_phantom_is_non_negative_with_organ_contrast() -> None:
    phantom = make_phantom(1, modality="mr")
    assert phantom.values.min() >= 0
    body = phantom.values[phantom.labels == CLASSES.index("body")]
    assert (body > 700).mean() > 0.05  # the bright fat rim of T1
    liver = phantom.values[phantom.labels == CLASSES.index("liver")].mean()
    spleen = phantom.values[phantom.labels == CLASSES.index("spleen")].mean()
    assert liver > spleen + 100


def test_dicom_series_reads_back_as_the_nifti_volume(tmp_path: Path) -> None:
    phantom = make_phantom(2, shape=(40, 32, 10))
    files = write_dicom_series(phantom, tmp_path / "series")
    names = [f.name for f in files]
    assert names != sorted(names)  # file names do not give the slice order
    z = [float(pydicom.dcmread(f).ImagePositionPatient[2]) for f in files]
    assert z == sorted(z)
    volume = canonical(load_volume(tmp_path / "series"))
    np.testing.assert_allclose(volume.affine, phantom.affine, atol=1e-6)
    np.testing.assert_array_equal(volume.data, np.rint(phantom.values))
    nifti = tmp_path / "v.nii.gz"
    nib.save(nib.Nifti1Image(np.rint(phantom.values).astype(np.int16), phantom.affine), nifti)
    spec = VolumeSpec(window_preset("abdomen"))
    np.testing.assert_array_equal(
        render_volume(tmp_path / "series", spec), render_volume(nifti, spec)
    )


@pytest.mark.parametrize(("modality", "dicom"), [("ct", False), ("ct", True), ("mr", False)])
def test_phantom_dataset_files_index_and_manifest(
    tmp_path: Path, modality: Modality, dicom: bool
) -> None:
    manifest = write_phantom_dataset(
        tmp_path,
        n_volumes=12,
        modality=modality,
        dicom=dicom,
        shape=(24, 24, 6),
    )
    text = manifest.read_text()
    assert f"modality: {modality}" in text and "classes: [background, body, liver" in text
    index = (tmp_path / "index.csv").read_text().splitlines()
    assert index[0] == "volume_id,path,mask,patient,liver_enlarged,has_lesion,split"
    assert len(index) == 13
    for line in index[1:]:
        _, path, mask, *_ = line.split(",")
        assert (tmp_path / path).exists() and (tmp_path / mask).is_file()
        image: Any = nib.load(tmp_path / mask)
        labels = np.asarray(image.dataobj)
        assert labels.shape == (24, 24, 6) and labels.max() < len(CLASSES)
    with pytest.raises(ValueError, match="CT phantoms only"):
        write_phantom_dataset(tmp_path / "x", modality="mr", dicom=True)


def test_label_map_slices_line_up_with_the_image_slices(tmp_path: Path) -> None:
    manifest = write_phantom_dataset(tmp_path, n_volumes=12, shape=(32, 28, 5))
    volume, mask = tmp_path / "volumes" / "ct003.nii.gz", tmp_path / "masks" / "ct003.nii.gz"
    for axis in ("axial", "coronal", "sagittal"):
        window = VolumeSpec(Window(0.0, 2000.0), axis)  # HU = 2000 * v - 1000
        hu = render_volume(volume, window) * 2000.0 - 1000.0
        labels = volume_stack(mask, axis)
        assert labels.shape == hu.shape
        for i, name in enumerate(CLASSES[2:], start=2):
            inside = hu[labels == i]
            if inside.size:  # noise sd 8 HU; bone (700) and kidney (150) stand far apart
                assert (np.abs(inside - CT_HU[name]) < 30).mean() > 0.99, (axis, name)
        assert (hu[labels == 0] < -900).all()
    assert manifest.is_file()
