"""Loading a dataset table: filters, ids, paths, patients, and every bad-input case."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from embedkit.errors import ManifestError
from embedkit.manifest import load_manifest

from .conftest import NIH_CSV, WriteManifest, nih_entry


def test_load_applies_filters_and_builds_columns(
    write_manifest: WriteManifest, tmp_path: Path
) -> None:
    entry = nih_entry(filters={"view": ["PA", "AP"]})
    table = load_manifest(write_manifest(entry)).dataset("demo").load()
    assert table.ids == ("a1", "a2", "a3", "a5", "a6")  # a4 (LL) filtered out, order kept
    assert len(table) == 5
    assert table.paths[1] == tmp_path / "images" / "p1" / "a2.png"
    assert all(p.is_absolute() for p in table.paths)
    assert table.patients == ("p1", "p1", "p2", "p4", "p5")
    assert table.split.dtype == np.dtype("<U5")
    assert table.has_patients


def test_ids_keep_leading_zeros_and_na_text(write_manifest: WriteManifest) -> None:
    csv = "image_id,path,patient_id,findings\n0001,x.png,NA,No Finding\n0002,y.png,None,Effusion\n"
    table = load_manifest(write_manifest(csv=csv)).dataset("demo").load()
    assert table.ids == ("0001", "0002")
    assert table.patients == ("NA", "None")


def test_without_patient_column_each_image_is_its_own_patient(
    write_manifest: WriteManifest,
) -> None:
    table = load_manifest(write_manifest(nih_entry(patient_column=None))).dataset("demo").load()
    assert table.patients == table.ids
    assert not table.has_patients


def test_path_column_defaults_to_id_column(write_manifest: WriteManifest, tmp_path: Path) -> None:
    table = load_manifest(write_manifest(nih_entry(path_column=None))).dataset("demo").load()
    assert table.paths[0] == tmp_path / "images" / "a1"


def test_indices_and_rows_for_ids(write_manifest: WriteManifest) -> None:
    table = load_manifest(write_manifest()).dataset("demo").load()
    all_rows = np.concatenate([table.indices(s) for s in ("train", "val", "test")])
    assert sorted(all_rows.tolist()) == list(range(len(table)))
    for split in ("train", "val", "test"):
        rows = table.indices(split)
        assert rows.dtype == np.int64
        assert (table.split[rows] == split).all()
        assert (np.diff(rows) > 0).all()
    assert table.rows_for_ids(["a3", "a1"]).tolist() == [2, 0]
    assert table.rows_for_ids(["a3", "a1"]).dtype == np.int64
    with pytest.raises(
        ManifestError, match=r"2 of 3 ids are not in the table \(first: 'zz', 'yy'\)"
    ):
        table.rows_for_ids(["zz", "a1", "yy"])
    with pytest.raises(ManifestError, match=r"unknown split 'valid'; did you mean 'val'\?"):
        table.indices("valid")


def test_tsv_and_parquet_index(write_manifest: WriteManifest, tmp_path: Path) -> None:
    write_manifest()
    frame = pd.read_csv(tmp_path / "index.csv", dtype=str)
    frame.to_csv(tmp_path / "index.tsv", sep="\t", index=False)
    frame["patient_id"] = frame["patient_id"].str[1:].astype(int)  # numeric column in Parquet
    frame.to_parquet(tmp_path / "index.parquet")
    tsv = load_manifest(write_manifest(nih_entry(index="index.tsv"))).dataset("demo").load()
    pq = load_manifest(write_manifest(nih_entry(index="index.parquet"))).dataset("demo").load()
    assert tsv.ids == pq.ids == ("a1", "a2", "a3", "a4", "a5", "a6")
    assert pq.patients[:3] == ("1", "1", "2")
    np.testing.assert_array_equal(tsv.labels.y, pq.labels.y)


# ---- bad input ---------------------------------------------------------------------------------


def test_index_file_missing(write_manifest: WriteManifest, tmp_path: Path) -> None:
    config = load_manifest(write_manifest(nih_entry(index="nope.csv"))).dataset("demo")
    with pytest.raises(ManifestError, match=rf"{tmp_path / 'nope.csv'}: index file not found"):
        config.load()


def test_missing_column_lists_columns_and_suggests(write_manifest: WriteManifest) -> None:
    config = load_manifest(write_manifest(nih_entry(patient_column="patient"))).dataset("demo")
    with pytest.raises(ManifestError) as info:
        config.load()
    message = str(info.value)
    assert (
        "index.csv: no column 'patient' (named by patient_column); did you mean 'patient_id'"
        in message
    )
    assert "Columns in index.csv: 'image_id', 'path', 'patient_id', 'findings', 'view'" in message


def test_filter_naming_missing_column(write_manifest: WriteManifest) -> None:
    config = load_manifest(write_manifest(nih_entry(filters={"View Position": ["PA"]}))).dataset(
        "demo"
    )
    with pytest.raises(ManifestError, match=r"no column 'View Position' \(named by filters\)"):
        config.load()


def test_all_rows_filtered_out(write_manifest: WriteManifest) -> None:
    config = load_manifest(write_manifest(nih_entry(filters={"view": ["pa"]}))).dataset("demo")
    with pytest.raises(ManifestError) as info:
        config.load()
    message = str(info.value)
    assert "the filters remove all 6 rows" in message
    assert "the index has 'AP', 'LL', 'PA'; did you mean 'PA'?" in message


def test_duplicate_ids(write_manifest: WriteManifest) -> None:
    csv = NIH_CSV + "a2,p9/a2b.png,p9,Effusion,PA\na3,x.png,p9,Effusion,PA\n"
    config = load_manifest(write_manifest(csv=csv)).dataset("demo")
    with pytest.raises(ManifestError) as info:
        config.load()
    message = str(info.value)
    assert "2 image ids appear more than once (first: 'a2', 'a3'" in message
    assert "index.csv rows 3, 4, 8, 9" in message


@pytest.mark.parametrize(
    "bad_path", ["../outside.png", "p1/../../outside.png", "/etc/passwd", "C:\\x.png"]
)
def test_path_escaping_images_root(write_manifest: WriteManifest, bad_path: str) -> None:
    csv = NIH_CSV + f'a7,"{bad_path}",p7,Effusion,PA\n'
    config = load_manifest(write_manifest(csv=csv)).dataset("demo")
    with pytest.raises(
        ManifestError, match=r"index\.csv row 8: path .* is not inside the images root"
    ):
        config.load()


def test_path_with_harmless_dots_is_fine(write_manifest: WriteManifest, tmp_path: Path) -> None:
    csv = NIH_CSV + "a7,p7/../p7/a..7.png,p7,Effusion,PA\n"
    table = load_manifest(write_manifest(csv=csv)).dataset("demo").load()
    assert table.paths[-1] == tmp_path / "images" / "p7/../p7/a..7.png"


def test_blank_id_names_row(write_manifest: WriteManifest) -> None:
    csv = NIH_CSV + ",p7/a7.png,p7,Effusion,PA\n"
    with pytest.raises(ManifestError, match=r"index\.csv rows 8: empty 'image_id' cell"):
        load_manifest(write_manifest(csv=csv)).dataset("demo").load()


def test_empty_index(write_manifest: WriteManifest) -> None:
    csv = "image_id,path,patient_id,findings,view\n"
    with pytest.raises(ManifestError, match=r"the index has no rows"):
        load_manifest(write_manifest(csv=csv)).dataset("demo").load()
