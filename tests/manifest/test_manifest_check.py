"""The `manifest check` report: counts, leakage, missing files, rendering."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from rich.console import Console

from embedkit.manifest import LabelCount, SplitSize, check_dataset, load_manifest, render_report

from .conftest import NIH_CSV, WriteManifest, nih_entry

LEAKY_CSV = """\
image_id,path,patient_id,findings,split
a,a.png,p1,Effusion,train
b,b.png,p1,No Finding,test
c,c.png,p2,Nodule,train
d,d.png,p3,Effusion,val
e,e.png,p3,Effusion,val
"""
GIVEN = {"method": "given", "column": "split"}


def _text(report_table: object) -> str:
    console = Console(record=True, width=160, color_system=None)
    console.print(report_table)
    return console.export_text()


def test_counts_by_split_and_label(write_manifest: WriteManifest) -> None:
    config = load_manifest(write_manifest(nih_entry(splits=GIVEN), csv=LEAKY_CSV)).dataset("demo")
    report = check_dataset(config)
    assert report.images == 5
    assert report.patients == 3
    assert report.splits == (
        SplitSize("train", 2, 2),
        SplitSize("val", 2, 1),
        SplitSize("test", 1, 1),
    )
    assert LabelCount("Effusion", "all", 3, 2, 0) in report.labels
    assert LabelCount("Effusion", "val", 2, 0, 0) in report.labels
    assert LabelCount("Nodule", "test", 0, 1, 0) in report.labels
    assert report.split_method == "given"
    assert report.label_kind == "multilabel"


def test_given_split_leakage_fails_loudly(write_manifest: WriteManifest) -> None:
    config = load_manifest(write_manifest(nih_entry(splits=GIVEN), csv=LEAKY_CSV)).dataset("demo")
    report = check_dataset(config)
    assert report.leakage == ("p1",)
    assert not report.ok
    assert any(p.startswith("LEAKAGE: 1 patients") and "'p1'" in p for p in report.problems)
    text = _text(render_report(report))
    assert "FAILED" in text
    assert "LEAKAGE" in text


def test_clean_patient_split_passes(write_manifest: WriteManifest) -> None:
    report = check_dataset(load_manifest(write_manifest()).dataset("demo"))
    assert report.ok
    assert report.leakage == ()
    assert sum(s.images for s in report.splits) == 6
    assert not report.files_checked
    assert report.missing_files == 0
    text = _text(render_report(report))
    assert "OK" in text
    assert "Effusion" in text
    assert "2 / 4 / 0" in text


def test_no_patient_column_is_reported(write_manifest: WriteManifest) -> None:
    report = check_dataset(
        load_manifest(write_manifest(nih_entry(patient_column=None))).dataset("demo")
    )
    assert report.patient_column is None
    assert report.patients == 6
    assert any("each image counts as its own patient" in w for w in report.warnings)
    assert "one patient per image" in _text(render_report(report))


def test_missing_files_checked_only_on_request(
    write_manifest: WriteManifest, tmp_path: Path
) -> None:
    config = load_manifest(write_manifest()).dataset("demo")
    for rel in ("p1/a1.png", "p1/a2.png", "p2/a3.png", "p3/a4.png"):
        (tmp_path / "images" / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "images" / rel).write_bytes(b"")
    (tmp_path / "images" / "p4" / "a5.png").mkdir(parents=True)  # a folder is not an image
    assert check_dataset(config).ok
    report = check_dataset(config, check_files=True)
    assert report.missing_files == 2
    assert not report.ok
    assert report.missing_examples == (
        str(tmp_path / "images/p4/a5.png"),
        str(tmp_path / "images/p5/a6.png"),
    )
    assert "2 of 6 image files do not exist" in _text(render_report(report))


def test_warns_on_empty_split_and_labels_without_positives(write_manifest: WriteManifest) -> None:
    entry = nih_entry(
        splits={"method": "patient", "fractions": {"train": 0.98, "val": 0.01, "test": 0.01}}
    )
    report = check_dataset(load_manifest(write_manifest(entry, csv=NIH_CSV)).dataset("demo"))
    assert any("split 'val' is empty" in w for w in report.warnings)
    assert report.ok  # warnings do not fail the check


def test_multiclass_counts(write_manifest: WriteManifest) -> None:
    csv = "image_id,path,patient_id,diagnosis\na,a,p,covid\nb,b,q,normal\nc,c,r,normal\n"
    entry = nih_entry(
        labels={"format": "single", "column": "diagnosis"},
        splits={"method": "patient", "fractions": {"train": 1.0, "test": 0.0}},
    )
    report = check_dataset(load_manifest(write_manifest(entry, csv=csv)).dataset("demo"))
    assert report.label_kind == "multiclass"
    assert LabelCount("normal", "all", 2, 1, 0) in report.labels
    assert np.array([c.split for c in report.labels if c.name == "covid"]).tolist() == [
        "all",
        "train",
    ]
