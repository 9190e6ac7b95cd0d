"""Splits: patient-wise (deterministic, no leakage), given column, id files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from embedkit.errors import ManifestError
from embedkit.manifest import Fractions, load_manifest, patient_split

from .conftest import NIH_CSV, WriteManifest, nih_entry


def _skewed_index(rng: np.random.Generator, n_patients: int = 300) -> pd.DataFrame:
    """Patients with 1 to 60 images each (a few with many), NIH-like columns."""
    counts = np.where(
        rng.random(n_patients) < 0.05,
        rng.integers(20, 60, n_patients),
        rng.integers(1, 4, n_patients),
    )
    patients = np.repeat([f"P{i:04d}" for i in range(n_patients)], counts)
    n = len(patients)
    findings = rng.choice(["No Finding", "Effusion", "Nodule|Effusion", "Cardiomegaly"], n)
    return pd.DataFrame(
        {
            "image_id": [f"img{i}" for i in range(n)],
            "path": [f"x/{i}.png" for i in range(n)],
            "patient_id": patients,
            "findings": findings,
            "view": "PA",
        }
    )


def _split_of(path: Path) -> dict[str, str]:
    table = load_manifest(path).dataset("demo").load()
    return dict(zip(table.ids, table.split.tolist(), strict=True))


def test_patient_split_independent_of_row_order(write_manifest: WriteManifest) -> None:
    frame = _skewed_index(np.random.default_rng(1))
    first = _split_of(write_manifest(csv=frame.to_csv(index=False)))
    shuffled = frame.sample(frac=1.0, random_state=7)
    second = _split_of(write_manifest(csv=shuffled.to_csv(index=False)))
    assert first == second
    other_seed = nih_entry(
        splits={
            "method": "patient",
            "fractions": {"train": 0.6, "val": 0.2, "test": 0.2},
            "seed": 1,
        }
    )
    third = _split_of(write_manifest(other_seed, csv=frame.to_csv(index=False)))
    assert third != first


def test_patient_split_never_splits_a_patient_and_tracks_image_fractions(
    write_manifest: WriteManifest,
) -> None:
    frame = _skewed_index(np.random.default_rng(2))
    table = load_manifest(write_manifest(csv=frame.to_csv(index=False))).dataset("demo").load()
    per_patient = pd.DataFrame({"p": table.patients, "s": table.split}).groupby("p")["s"].nunique()
    assert (per_patient == 1).all()
    shares = {s: table.indices(s).size / len(table) for s in ("train", "val", "test")}
    assert shares["train"] == pytest.approx(0.6, abs=0.06)
    assert shares["val"] == pytest.approx(0.2, abs=0.06)
    assert shares["test"] == pytest.approx(0.2, abs=0.06)


def test_patient_split_matches_documented_algorithm() -> None:
    patients = np.array(["b", "a", "a", "c", "a", "d"])
    split = patient_split(patients, Fractions(train=0.5, val=0.0, test=0.5), seed=3)
    unique, counts = np.array(["a", "b", "c", "d"]), np.array([3, 1, 1, 1])
    order = np.random.default_rng(3).permutation(4)
    middle = np.cumsum(counts[order]) - counts[order] / 2
    expected_of = dict(zip(unique[order], np.where(middle < 3, "train", "test"), strict=True))
    assert split.tolist() == [expected_of[p] for p in patients]
    assert "val" not in split  # val 0 → empty


def test_patient_split_zero_val_and_zero_test() -> None:
    patients = np.array([f"p{i}" for i in range(50)])
    assert set(patient_split(patients, Fractions(train=1.0, val=0.0, test=0.0), 0).tolist()) == {
        "train"
    }
    split = patient_split(patients, Fractions(train=0.8, val=0.0, test=0.2), 0)
    assert (split == "train").sum() == 40
    assert (split == "test").sum() == 10


GIVEN_CSV = """\
image_id,path,patient_id,findings,split
a,a,p,Effusion,train
b,b,q,No Finding,valid
c,c,r,Nodule,test
"""


def test_given_split_maps_values(write_manifest: WriteManifest) -> None:
    given = {
        "method": "given",
        "column": "split",
        "values": {"train": "train", "val": "valid", "test": "test"},
    }
    table = (
        load_manifest(write_manifest(nih_entry(splits=given), csv=GIVEN_CSV)).dataset("demo").load()
    )
    assert table.split.tolist() == ["train", "val", "test"]


def test_given_split_unmapped_value(write_manifest: WriteManifest) -> None:
    given = {"method": "given", "column": "split"}  # default values: train / val / test
    with pytest.raises(
        ManifestError,
        match=r"index\.csv rows 3: .*'valid' \(1 rows\)\. Map them under splits\.values",
    ):
        load_manifest(write_manifest(nih_entry(splits=given), csv=GIVEN_CSV)).dataset("demo").load()


FILES = {"splits/train.txt": "a1\na2\n\na3\n", "splits/test.txt": "a5\na4\n"}
FILES_SPEC = {"method": "files", "train": "splits/train.txt", "test": "splits/test.txt"}


def test_files_split(write_manifest: WriteManifest) -> None:
    table = (
        load_manifest(write_manifest(nih_entry(splits=FILES_SPEC), files=FILES))
        .dataset("demo")
        .load()
    )
    assert table.split.tolist() == ["train", "train", "train", "test", "test", ""]
    assert table.notes == ("1 images are in no split file (split '')",)


def test_files_split_ids_removed_by_filters_are_noted(write_manifest: WriteManifest) -> None:
    entry = nih_entry(splits=FILES_SPEC, filters={"view": ["PA", "AP"]})
    table = load_manifest(write_manifest(entry, files=FILES)).dataset("demo").load()
    assert "a4" not in table.ids
    assert "1 ids of the 'test' split file were removed by filters" in table.notes


def test_files_split_id_in_two_files(write_manifest: WriteManifest) -> None:
    files = {**FILES, "splits/test.txt": "a5\na2\n"}
    with pytest.raises(
        ManifestError, match=r"test\.txt: 1 ids are also in the 'train' split file \(first: 'a2'\)"
    ):
        load_manifest(write_manifest(nih_entry(splits=FILES_SPEC), files=files)).dataset(
            "demo"
        ).load()


def test_files_split_unknown_ids(write_manifest: WriteManifest) -> None:
    files = {**FILES, "splits/test.txt": "a5\nzz1\nzz2\n"}
    with pytest.raises(
        ManifestError, match=r"test\.txt: 2 of 3 ids are not in the index \(first: 'zz1', 'zz2'\)"
    ):
        load_manifest(write_manifest(nih_entry(splits=FILES_SPEC), files=files)).dataset(
            "demo"
        ).load()


def test_files_split_missing_file(write_manifest: WriteManifest) -> None:
    files = {"splits/train.txt": "a1\n"}
    with pytest.raises(ManifestError, match=r"test\.txt: split file for 'test' not found"):
        load_manifest(write_manifest(nih_entry(splits=FILES_SPEC), files=files)).dataset(
            "demo"
        ).load()


def test_demo_csv_gets_all_three_splits(write_manifest: WriteManifest) -> None:
    table = load_manifest(write_manifest(csv=NIH_CSV)).dataset("demo").load()
    assert set(table.split.tolist()) <= {"train", "val", "test"}
    assert table.split[0] == table.split[1]  # a1, a2 share patient p1
