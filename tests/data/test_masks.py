"""Label maps: PNG and NIfTI reading, class and shape checks, nearest-neighbour geometry."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from embedkit.data import masks as M
from embedkit.data.policies import SliceAxis
from embedkit.data.transforms import Preprocessing
from embedkit.errors import ImageNotFoundError, ImageReadError, ManifestError

CLASSES = ("background", "liver", "spleen")


def _ids(h: int = 6, w: int = 9) -> np.ndarray:
    ids = np.zeros((h, w), np.int64)
    ids[1:4, 2:5] = 1
    ids[4:, 6:] = 2
    return ids


@pytest.mark.parametrize("mode", ["L", "P", "I;16"])
def test_png_label_maps_keep_their_ids(tmp_path: Path, mode: str) -> None:
    ids = _ids()
    image = Image.fromarray(ids.astype(np.uint16 if mode == "I;16" else np.uint8))
    if mode == "P":
        image = image.convert("L").convert("P")
        image.putpalette([v for i in range(256) for v in (255 - i, i, 0)])  # colours != ids
    path = tmp_path / "m.png"
    image.save(path)
    label_map = M.check_label_map(M.read_label_map(path), CLASSES, (6, 9))
    np.testing.assert_array_equal(label_map.ids, ids)
    assert label_map.spacing == (1.0, 1.0)


def test_nifti_label_map_and_spacing(tmp_path: Path) -> None:
    import nibabel as nib

    ids = np.stack([_ids(), _ids()[::-1]], axis=-1).astype(np.int16)
    image = nib.Nifti1Image(ids, np.diag([0.8, 0.8, 2.5, 1.0]))
    path = tmp_path / "m.nii.gz"
    nib.save(image, path)
    label_map = M.read_label_map(path)
    np.testing.assert_array_equal(label_map.ids, ids)
    assert label_map.spacing == pytest.approx((0.8, 0.8, 2.5))


def test_bad_masks_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(ImageNotFoundError):
        M.read_label_map(tmp_path / "missing.png")
    rgb = tmp_path / "rgb.png"
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(rgb)
    with pytest.raises(ImageReadError, match="single-channel"):
        M.read_label_map(rgb)
    path = tmp_path / "m.png"
    Image.fromarray((_ids() * 2).astype(np.uint8)).save(path)
    with pytest.raises(ManifestError, match=r"class ids \[4\] are not in the dataset's classes"):
        M.check_label_map(M.read_label_map(path), CLASSES)
    with pytest.raises(ManifestError, match=r"mask shape \(6, 9\) does not match .* \(9, 6\)"):
        M.check_label_map(M.read_label_map(path), ("a", "b", "c", "d", "e"), (9, 6))


def test_image_shape_from_header(tmp_path: Path) -> None:
    path = tmp_path / "x.png"
    Image.fromarray(np.zeros((5, 7), np.uint8)).save(path)
    assert M.image_shape(path) == (5, 7)


def test_nearest_resize_picks_pixel_centres() -> None:
    ids = np.arange(16).reshape(4, 4)
    np.testing.assert_array_equal(M.nearest_resize(ids, (2, 2)), [[5, 7], [13, 15]])
    up = M.nearest_resize(np.array([[1, 2]]), (1, 4))
    np.testing.assert_array_equal(up, [[1, 1, 2, 2]])


@pytest.mark.parametrize("mode", ["squash", "pad", "crop"])
def test_model_grid_follows_the_image_geometry(mode: str) -> None:
    # A one-hot "image" of each class through the image transform (bilinear) and the mask
    # through nearest must agree wherever the image is not blended across a class border.
    ids = np.zeros((12, 20), np.int64)
    ids[:, 10:] = 1
    ids[8:, :4] = 2
    grid = M.to_model_grid(ids, mode, 8)  # type: ignore[arg-type]
    pre = Preprocessing(size=8, resize=mode, antialias=False, mean=(0, 0, 0), std=(1, 1, 1))  # type: ignore[arg-type]
    for c in (1, 2):  # (class 0 differs where padded: background in the mask, 0 in the image)
        x = pre((ids == c).astype(np.float32))[0].numpy()
        sure = (x < 0.01) | (x > 0.99)
        np.testing.assert_array_equal((grid == c)[sure], (x > 0.5)[sure])
    if mode == "pad":
        assert (grid[0] == 0).all()  # letterbox rows are background


@pytest.mark.parametrize("mode", ["squash", "pad", "crop"])
def test_logits_go_back_onto_the_mask_pixels(mode: str) -> None:
    ids = np.zeros((12, 20), np.int64)
    ids[2:10, 3:17] = 1
    grid = M.to_model_grid(ids, mode, 24)  # type: ignore[arg-type]
    logits = torch.from_numpy(np.stack([grid == 0, grid == 1]).astype(np.float32)) * 10
    back = M.logits_to_mask(logits, ids.shape, mode).argmax(0).numpy()  # type: ignore[arg-type]
    rows, cols = M.scored_region(ids.shape, mode)  # type: ignore[arg-type]
    region = ids[rows, cols]
    assert back.shape == region.shape
    assert (back == region).mean() > 0.97


def _seg_manifest(tmp_path: Path, csv: str, classes: object = ("background", "liver")) -> Path:
    import yaml

    (tmp_path / "index.csv").write_text(csv)
    entry = {
        "images": "./images",
        "index": "./index.csv",
        "id_column": "id",
        "labels": {"format": "single", "column": "site"},
        "splits": {"method": "given", "column": "split"},
        "classes": classes,
    }
    path = tmp_path / "m.yaml"
    path.write_text(yaml.safe_dump({"datasets": {"seg": entry}}))
    return path


SEG_CSV = "id,site,split,mask\na.png,x,train,m/a.png\nb.png,y,test,m/b.png\n"


def test_manifest_classes_and_mask_column(tmp_path: Path) -> None:
    from embedkit.manifest import load_manifest

    table = load_manifest(_seg_manifest(tmp_path, SEG_CSV)).dataset("seg").load()
    assert table.classes == ("background", "liver")
    assert table.masks == (tmp_path / "images/m/a.png", tmp_path / "images/m/b.png")
    plain = load_manifest(_seg_manifest(tmp_path, SEG_CSV, None)).dataset("seg").load()
    assert plain.masks is None and plain.classes is None
    assert plain.splits_digest != table.splits_digest  # the masks are part of what is learnt


def test_manifest_mask_errors(tmp_path: Path) -> None:
    from embedkit.manifest import load_manifest

    with pytest.raises(ManifestError, match="background and at least one class"):
        load_manifest(_seg_manifest(tmp_path, SEG_CSV, ["background"]))
    with pytest.raises(ManifestError, match=r"classes lists \['liver'\] more than once"):
        load_manifest(_seg_manifest(tmp_path, SEG_CSV, ["bg", "liver", "liver"]))
    no_column = "id,site,split\na.png,x,train\n"
    with pytest.raises(ManifestError, match="mask"):
        load_manifest(_seg_manifest(tmp_path, no_column)).dataset("seg").load()
    blank = "id,site,split,mask\na.png,x,train,\nb.png,y,test,m/b.png\n"
    with pytest.raises(ManifestError, match="empty 'mask' cell"):
        load_manifest(_seg_manifest(tmp_path, blank)).dataset("seg").load()


@pytest.mark.parametrize("axis", ["axial", "coronal", "sagittal"])
def test_volume_label_slices_and_spacing_follow_the_image_slices(
    tmp_path: Path, axis: SliceAxis
) -> None:
    """A label map stored LAS-like with permuted axes reads back on the image slices' grid, and
    its spacing is permuted with the axes (checked against nibabel's canonical zooms)."""
    import nibabel as nib

    from embedkit.data.masks import read_volume_labels, stack_geometry
    from embedkit.data.volumes import SLICE_AXES, volume_stack

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, (5, 7, 4)).astype(np.uint8)
    # array axes: 0 -> S, 1 -> L (flipped R), 2 -> A; spacings 2.0, 0.5, 3.0
    affine = np.array([[0, -0.5, 0, 0], [0, 0, 3.0, 0], [2.0, 0, 0, 0], [0, 0, 0, 1.0]])
    path = tmp_path / "mask.nii.gz"
    nib.save(nib.Nifti1Image(labels, affine), path)
    read = read_volume_labels(path, axis)
    np.testing.assert_array_equal(read.ids, volume_stack(path, axis))
    canonical = nib.as_closest_canonical(nib.load(path))
    ras = np.asarray(canonical.header.get_zooms()[:3], dtype=float)  # R, A, S spacing
    s = SLICE_AXES[axis]
    p, q = (a for a in range(3) if a != s)
    assert read.spacing == (ras[s], ras[q], ras[p])
    assert stack_geometry(path, axis) == (read.ids.shape, read.spacing)
    # the stack's slice k is the canonical array cut at k, shown radiologically
    data = np.asarray(canonical.dataobj)
    cut = np.take(data, 2, axis=s)
    np.testing.assert_array_equal(read.ids[2], cut[::-1, ::-1].T)
