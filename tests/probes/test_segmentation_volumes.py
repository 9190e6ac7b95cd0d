"""End to end: phantom CT volumes -> `embedkit extract --patch-tokens` (tiny model) ->
`embedkit probe --kind segmentation` -> a record with per-volume Dice / IoU / HD95."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from embedkit.cli import app
from embedkit.data.masks import read_volume_labels
from embedkit.data.phantoms import CLASSES, CT_HU, write_phantom_dataset
from embedkit.manifest import load_manifest
from embedkit.probes.run import find_probe_entry, patch_data
from embedkit.store import CacheRoot

from ..conftest import cli_env

runner = CliRunner()
SHAPE = (48, 48, 6)
RES = 112
COMMON = ["--model", "test/tiny-dinov2", "--dataset", "phantom-ct", "--resolution", str(RES)]


@pytest.fixture(scope="module")
def extracted(tmp_path_factory: pytest.TempPathFactory, model_cache: Path) -> Path:
    manifest = write_phantom_dataset(tmp_path_factory.mktemp("phantom-seg"), shape=SHAPE)
    args = [
        "extract", *COMMON, "--patch-tokens", "--batch-size", "8", "--unit-rows", "16",
        "--workers", "0", "--device", "cpu", "--manifest", str(manifest),
    ]  # fmt: skip
    result = runner.invoke(app, args, env=cli_env(model_cache))
    assert result.exit_code == 0, result.output
    return manifest


def test_the_probe_reads_mask_slice_k_on_the_grid_of_image_slice_k(extracted: Path) -> None:
    from embedkit.probes.segmentation import _label_maps

    table = load_manifest(extracted).dataset("phantom-ct").load()
    entry = find_probe_entry(CacheRoot.from_uri(load_manifest(extracted).cache), "phantom-ct",
                             "test/tiny-dinov2", RES, None)  # fmt: skip
    data = patch_data("phantom-ct", entry, table, "patch")
    split = data.test
    assert split.volume_slices is not None and split.slices is not None
    masks = _label_maps(split, data.classes)
    level, width = 50.0, 400.0  # the manifest's abdomen window: HU = level + width * (v - 0.5)
    checked = 0
    for i in range(len(split.ids)):
        truth, spacing = masks.row(i)
        hu = level + width * (split.volume_slices[i].read() - 0.5)
        assert truth.shape == hu.shape and len(spacing) == 3
        for c, name in enumerate(CLASSES):
            inside = hu[truth == c]
            if name in ("body", "liver", "spleen") and inside.size:  # inside the window
                assert np.abs(np.median(inside) - CT_HU[name]) < 10, (split.ids[i], name)
                checked += 1
            if name == "bone" and inside.size:  # 700 HU: above the window's top (250)
                assert (inside > 240).mean() > 0.95
    assert checked > len(split.ids)  # most slices hold several organs


def _best_constant(truths: list[np.ndarray], n_classes: int) -> float:
    """The best mean Dice (mean over classes of the per-volume means, absent-from-both left
    out) of predicting one class everywhere; an empty prediction scores 0 on every class."""
    best = 0.0
    for c in range(1, n_classes):
        per_class = []
        for k in range(1, n_classes):
            scores = [
                (2 * (t == k).sum() / ((t == k).sum() + t.size) if c == k else 0.0)
                for t in truths
                if (t == k).any() or c == k
            ]
            per_class.append(float(np.mean(scores)))
        best = max(best, float(np.mean(per_class)))
    return best


@pytest.mark.slow
def test_segmentation_probe_on_phantom_ct_volumes(
    extracted: Path, model_cache: Path, tmp_path: Path
) -> None:
    from embedkit.results import load_record, load_scores

    args = ["probe", *COMMON, "--kind", "segmentation", "--n-boot", "200",
            "--out", str(tmp_path / "results"), "--manifest", str(extracted)]  # fmt: skip
    result = runner.invoke(app, args, env=cli_env(model_cache))
    assert result.exit_code == 0, result.output
    (path,) = (tmp_path / "results").rglob("segmentation-*.json")
    record = load_record(path)
    assert record.task == "segmentation" and record.labels == list(CLASSES[1:])
    assert set(record.metrics) == {"dice", "iou", "hd95"}  # 3D: HD95 too
    scores = load_scores(path)
    test_volumes = ("ct008", "ct009", "ct010", "ct011")
    assert scores.ids == test_volumes  # one row per volume, not per slice
    truths = [
        read_volume_labels(Path(extracted.parent, "masks", f"{v}.nii.gz"), "axial").ids
        for v in test_volumes
    ]
    # y: the class is in the volume's truth; mask: every entry (targets are data only)
    in_truth = np.array([[(t == c).any() for c in range(1, len(CLASSES))] for t in truths])
    np.testing.assert_array_equal(scores.y.astype(bool), in_truth)
    assert scores.mask.all()
    dice = record.metrics["dice"]["point"]
    constant, empty = _best_constant(truths, len(CLASSES)), 0.0
    baseline = max(constant, empty)
    low, high = record.metrics["dice"]["low"], record.metrics["dice"]["high"]
    # the margin: the baseline again (at least twice its Dice) plus the width of the 95% CI
    margin = baseline + (high - low)
    assert dice > baseline + margin and low > baseline, (dice, low, high, baseline)
    # the large organs are segmented well on their own
    per_label = {row["label"]: row["dice"]["point"] for row in record.per_label}
    assert per_label["body"] > 0.5 and per_label["liver"] > per_label["lesion"], per_label
    hd95 = record.metrics["hd95"]
    assert 0 <= hd95["low"] <= hd95["point"] <= hd95["high"]
