"""Volume datasets in the manifest: the `volumes:` block, one row per slice, and its errors."""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pytest
import yaml
from rich.console import Console

from embedkit.data.phantoms import write_phantom_dataset
from embedkit.data.readers import read_image
from embedkit.data.volumes import VolumeSlice, VolumeSpec, render_volume, window_preset
from embedkit.errors import ManifestError
from embedkit.manifest import check_dataset, load_manifest, render_report

SHAPE = (24, 20, 6)


@pytest.fixture(scope="module")
def phantom_manifest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_phantom_dataset(tmp_path_factory.mktemp("phantom"), n_volumes=12, shape=SHAPE)


def _edit(manifest: Path, tmp_path: Path, **changes: object) -> Path:
    """A copy of the phantom manifest (paths made absolute) with ``changes`` to the entry."""
    document = yaml.safe_load(manifest.read_text())
    entry = document["datasets"]["phantom-ct"]
    entry["images"] = str(manifest.parent)
    entry["index"] = str(manifest.parent / "index.csv")
    entry.update(changes)
    out = tmp_path / "data_manifest.yaml"
    out.write_text(yaml.safe_dump(document))
    return out


def test_one_row_per_slice_with_volume_id_and_index(phantom_manifest: Path) -> None:
    config = load_manifest(phantom_manifest).dataset("phantom-ct")
    assert config.classes is not None and config.classes[:3] == ("background", "body", "liver")
    table = config.load()
    n_slices = SHAPE[2]
    assert len(table) == 12 * n_slices
    assert table.ids[:3] == ("ct000/0", "ct000/1", "ct000/2")
    assert table.volumes is not None and table.slices is not None
    assert table.volumes[n_slices] == "ct001" and table.slices[n_slices + 2] == 2
    assert table.reading == {
        "volumes": {"slice_axis": "axial", "window": {"level": 50.0, "width": 400.0}}
    }
    # Labels, patients and the split are the volume's, on every slice.
    for volume in ("ct000", "ct005", "ct011"):
        rows = [i for i, v in enumerate(table.volumes) if v == volume]
        assert len(rows) == n_slices and len({table.patients[r] for r in rows}) == 1
        assert len(set(table.split[rows].tolist())) == 1
        assert (table.labels.y[rows] == table.labels.y[rows[0]]).all()
    assert table.labels.names == ("liver_enlarged", "has_lesion")
    assert table.labels.y[table.volumes.index("ct001")].tolist() == [1.0, 0.0]
    # paths are the files (for fingerprints and checks), sources the slices to read
    assert table.paths[7] == phantom_manifest.parent / "volumes" / "ct001.nii.gz"
    source = table.sources[7]
    assert isinstance(source, VolumeSlice) and source.index == 1
    assert os.fspath(source) == os.fspath(table.paths[7])
    stack = render_volume(table.paths[7], VolumeSpec(window_preset("abdomen")))
    np.testing.assert_array_equal(read_image(source), stack[1])


def test_splits_stay_patient_wise_and_check_reports_slices(phantom_manifest: Path) -> None:
    config = load_manifest(phantom_manifest).dataset("phantom-ct")
    report = check_dataset(config, check_files=True)
    assert not report.problems and report.missing_files == 0
    assert report.images == 12 * SHAPE[2] and report.patients == 12 and report.volumes == 12
    console = Console(record=True, width=160, color_system=None)
    console.print(render_report(report))
    assert re.search(r"volumes +12 \(the images are their slices\)", console.export_text())
    assert {s.split: s.patients for s in report.splits} == {"train": 4, "val": 4, "test": 4}


def test_window_and_slice_axis_change_the_reading(phantom_manifest: Path, tmp_path: Path) -> None:
    manifest = _edit(
        phantom_manifest,
        tmp_path,
        volumes={
            "modality": "ct",
            "window": {"level": -600, "width": 1500},
            "slice_axis": "coronal",
        },
    )
    table = load_manifest(manifest).dataset("phantom-ct").load()
    assert len(table) == 12 * SHAPE[1]  # coronal: one slice per voxel along A
    assert table.reading == {
        "volumes": {"slice_axis": "coronal", "window": {"level": -600.0, "width": 1500.0}}
    }
    mr = _edit(phantom_manifest, tmp_path, volumes={"modality": "mr", "percentiles": [1, 99]})
    reading = load_manifest(mr).dataset("phantom-ct").load().reading
    assert reading == {"volumes": {"slice_axis": "axial", "percentiles": [1.0, 99.0]}}


@pytest.mark.parametrize(
    ("volumes", "message"),
    [
        ({"modality": "ct", "window": "lungs"}, r"volumes\.window: .*did you mean 'lung'"),
        ({"modality": "ct"}, r"volumes\.window: required field is missing"),
        ({"modality": "pet", "window": "lung"}, r"volumes\.modality: 'pet' is not a valid"),
        ({"modality": "mr", "percentiles": [99, 1]}, "0 <= low < high <= 100"),
        ({"modality": "ct", "window": "bone", "slice_axis": "oblique"}, "slice_axis"),
        ({"modality": "ct", "window": {"level": 40, "width": 0}}, "greater than 0"),
    ],
)
def test_volume_block_errors(
    phantom_manifest: Path, tmp_path: Path, volumes: dict[str, object], message: str
) -> None:
    manifest = _edit(phantom_manifest, tmp_path, volumes=volumes)
    with pytest.raises(ManifestError, match=message):
        load_manifest(manifest)


def test_unreadable_volumes_name_their_rows(phantom_manifest: Path, tmp_path: Path) -> None:
    index = (phantom_manifest.parent / "index.csv").read_text()
    index = index.replace("volumes/ct003.nii.gz", "volumes/missing.nii.gz")
    index = index.replace("volumes/ct004.nii.gz", "masks/../index.csv")
    (tmp_path / "index.csv").write_text(index)
    manifest = _edit(phantom_manifest, tmp_path, index=str(tmp_path / "index.csv"))
    with pytest.raises(ManifestError) as info:
        load_manifest(manifest).dataset("phantom-ct").load()
    text = str(info.value)
    assert "2 of 12 volumes cannot be read" in text
    assert "index.csv row 5:" in text and "missing.nii.gz: no such volume" in text
    assert "index.csv row 6:" in text and "not a volume" in text


def test_a_segmentation_only_dataset_needs_no_labels(
    phantom_manifest: Path, tmp_path: Path
) -> None:
    document = yaml.safe_load(_edit(phantom_manifest, tmp_path).read_text())
    del document["datasets"]["phantom-ct"]["labels"]
    (tmp_path / "data_manifest.yaml").write_text(yaml.safe_dump(document))
    table = load_manifest(tmp_path / "data_manifest.yaml").dataset("phantom-ct").load()
    assert table.labels.names == () and table.labels.y.shape == (len(table), 0)
    assert table.masks is not None and len(table.masks) == len(table)
    # neither labels nor classes: nothing to probe, said at load
    del document["datasets"]["phantom-ct"]["classes"]
    (tmp_path / "data_manifest.yaml").write_text(yaml.safe_dump(document))
    with pytest.raises(ManifestError, match=r"needs `labels`.*`classes`"):
        load_manifest(tmp_path / "data_manifest.yaml")
