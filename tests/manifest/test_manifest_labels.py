"""The three label formats: values, masks under each policy, and bad cells named by row."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from embedkit.errors import ManifestError
from embedkit.manifest import Labels, load_manifest

from .conftest import NIH_CSV, WriteManifest, nih_entry


def _labels(write_manifest: WriteManifest, labels: dict[str, Any], csv: str = NIH_CSV) -> Labels:
    return (
        load_manifest(write_manifest(nih_entry(labels=labels), csv=csv))
        .dataset("demo")
        .load()
        .labels
    )


SEPARATED = {
    "format": "separated",
    "column": "findings",
    "separator": "|",
    "negative": "No Finding",
}


def test_separated_fixed_names_order(write_manifest: WriteManifest) -> None:
    labels = _labels(
        write_manifest,
        {**SEPARATED, "names": ["Nodule", "Cardiomegaly", "Effusion", "Pneumothorax"]},
    )
    assert labels.kind == "multilabel"
    assert labels.names == ("Nodule", "Cardiomegaly", "Effusion", "Pneumothorax")
    assert labels.y.dtype == np.float32
    assert labels.mask.dtype == np.bool_
    expected = [[0, 0, 0, 0], [1, 0, 1, 0], [0, 1, 0, 0], [0, 0, 0, 1], [0, 0, 0, 0], [0, 0, 1, 0]]
    np.testing.assert_array_equal(labels.y, np.array(expected, dtype=np.float32))
    assert labels.mask.all()


def test_separated_default_names_sorted_and_whitespace_tolerated(
    write_manifest: WriteManifest,
) -> None:
    csv = "image_id,path,patient_id,findings\na,a,p,Mass | Edema|\nb,b,q,No Finding\n"
    labels = _labels(write_manifest, SEPARATED, csv)
    assert labels.names == ("Edema", "Mass")
    np.testing.assert_array_equal(labels.y, [[1, 1], [0, 0]])


def test_separated_unknown_token_names_spreadsheet_row(write_manifest: WriteManifest) -> None:
    csv = NIH_CSV + "a7,p7/a7.png,p7,Effusion|Cardiomegally,PA\n"
    with pytest.raises(ManifestError) as info:
        _labels(write_manifest, {**SEPARATED, "names": ["Cardiomegaly", "Effusion"]}, csv)
    message = str(info.value)
    assert message.startswith(
        "index.csv row 3: label 'Nodule' is not in the label set"
    )  # row 3 = first data row holding an unknown label (header is row 1)
    assert "Other unknown labels: ['Cardiomegally', 'Pneumothorax']" in message
    assert "ignore_unknown: true" in message


def test_separated_misspelling_gets_suggestion(write_manifest: WriteManifest) -> None:
    csv = "image_id,path,patient_id,findings\na,a,p,Effusion\nb,b,q,Cardiomegally\n"
    with pytest.raises(
        ManifestError,
        match=r"^index\.csv row 3: label 'Cardiomegally' is not in the label set; "
        r"did you mean 'Cardiomegaly'\?",
    ):
        _labels(write_manifest, {**SEPARATED, "names": ["Cardiomegaly", "Effusion"]}, csv)


def test_separated_ignore_unknown_drops_them(write_manifest: WriteManifest) -> None:
    labels = _labels(write_manifest, {**SEPARATED, "names": ["Effusion"], "ignore_unknown": True})
    np.testing.assert_array_equal(labels.y[:, 0], [0, 1, 0, 0, 0, 1])


def test_separated_empty_cell_and_negative_with_findings(write_manifest: WriteManifest) -> None:
    csv = "image_id,path,patient_id,findings\na,a,p,Effusion\nb,b,q,\n"
    with pytest.raises(
        ManifestError, match=r"index\.csv row 3: empty 'findings' cell .*write 'No Finding'"
    ):
        _labels(write_manifest, SEPARATED, csv)
    no_negative = {k: v for k, v in SEPARATED.items() if k != "negative"}
    labels = _labels(write_manifest, no_negative, csv)  # without a negative token, blank = none
    np.testing.assert_array_equal(labels.y, [[1], [0]])
    csv = "image_id,path,patient_id,findings\na,a,p,Effusion|No Finding\n"
    with pytest.raises(ManifestError, match=r"row 2: 'No Finding' together with findings"):
        _labels(write_manifest, SEPARATED, csv)


COLUMNS_CSV = """\
image_id,path,patient_id,Edema,Cardiomegaly
a,a,p,1,0
b,b,q,-1,
c,c,r,0.0,1.0
d,d,s,,-1
"""


@pytest.mark.parametrize(
    ("uncertain", "blank", "y", "mask"),
    [
        (
            "negative",
            "negative",
            [[1, 0], [0, 0], [0, 1], [0, 0]],
            [[1, 1], [1, 1], [1, 1], [1, 1]],
        ),
        (
            "positive",
            "negative",
            [[1, 0], [1, 0], [0, 1], [0, 1]],
            [[1, 1], [1, 1], [1, 1], [1, 1]],
        ),
        ("ignore", "ignore", [[1, 0], [0, 0], [0, 1], [0, 0]], [[1, 1], [0, 0], [1, 1], [0, 0]]),
        ("ignore", "negative", [[1, 0], [0, 0], [0, 1], [0, 0]], [[1, 1], [0, 1], [1, 1], [1, 0]]),
    ],
)
def test_columns_policies(
    write_manifest: WriteManifest,
    uncertain: str,
    blank: str,
    y: list[list[int]],
    mask: list[list[int]],
) -> None:
    spec = {
        "format": "columns",
        "columns": ["Edema", "Cardiomegaly"],
        "uncertain": uncertain,
        "blank": blank,
    }
    labels = _labels(write_manifest, spec, COLUMNS_CSV)
    assert labels.names == ("Edema", "Cardiomegaly")
    np.testing.assert_array_equal(labels.y, np.array(y, dtype=np.float32))
    np.testing.assert_array_equal(labels.mask, np.array(mask, dtype=bool))


def test_columns_bad_value_names_row_and_column(write_manifest: WriteManifest) -> None:
    csv = COLUMNS_CSV + "e,e,t,1,yes\n"
    spec = {"format": "columns", "columns": ["Edema", "Cardiomegaly"]}
    with pytest.raises(
        ManifestError,
        match=r"^index\.csv row 6, column 'Cardiomegaly': 'yes' is not a label value; expected 1",
    ):
        _labels(write_manifest, spec, csv)


SINGLE_CSV = "image_id,path,patient_id,diagnosis\na,a,p,pneumonia\nb,b,q,normal\nc,c,r,covid\n"


def test_single_classes_default_sorted_and_given(write_manifest: WriteManifest) -> None:
    labels = _labels(write_manifest, {"format": "single", "column": "diagnosis"}, SINGLE_CSV)
    assert labels.kind == "multiclass"
    assert labels.names == ("covid", "normal", "pneumonia")
    assert labels.y.dtype == np.int64
    assert labels.y.tolist() == [2, 1, 0]
    assert labels.mask.shape == (3,)
    assert labels.mask.all()
    spec = {"format": "single", "column": "diagnosis", "classes": ["normal", "pneumonia", "covid"]}
    assert _labels(write_manifest, spec, SINGLE_CSV).y.tolist() == [1, 0, 2]


def test_single_unknown_class_and_empty_cell(write_manifest: WriteManifest) -> None:
    spec = {"format": "single", "column": "diagnosis", "classes": ["normal", "pneumonia"]}
    with pytest.raises(
        ManifestError, match=r"^index\.csv row 4: class 'covid' is not in labels\.classes"
    ):
        _labels(write_manifest, spec, SINGLE_CSV)
    csv = SINGLE_CSV.replace("pneumonia", "pneumonis")
    spec = {"format": "single", "column": "diagnosis", "classes": ["normal", "pneumonia", "covid"]}
    with pytest.raises(
        ManifestError, match=r"row 2: class 'pneumonis' .*; did you mean 'pneumonia'\?"
    ):
        _labels(write_manifest, spec, csv)
    csv = SINGLE_CSV + "d,d,s,\n"
    with pytest.raises(
        ManifestError,
        match=r"^index\.csv row 5: empty 'diagnosis' cell; every image needs one class",
    ):
        _labels(write_manifest, {"format": "single", "column": "diagnosis"}, csv)


def test_rows_are_counted_in_the_file_before_filters(write_manifest: WriteManifest) -> None:
    csv = NIH_CSV + "a7,p7/a7.png,p7,Cardiomegally,PA\n"
    entry = nih_entry(filters={"view": ["PA"]})
    path = write_manifest(entry, csv=csv)
    with pytest.raises(ManifestError, match=r"^index\.csv row 8: label 'Cardiomegally'"):
        load_manifest(path).dataset("demo").load()


def test_labels_counts(write_manifest: WriteManifest) -> None:
    spec = {"format": "columns", "columns": ["Edema", "Cardiomegaly"], "uncertain": "ignore"}
    labels = _labels(write_manifest, spec, COLUMNS_CSV)
    assert labels.counts() == [("Edema", 1, 2, 1), ("Cardiomegaly", 1, 2, 1)]
    assert labels.counts(np.array([0, 1])) == [("Edema", 1, 0, 1), ("Cardiomegaly", 0, 2, 0)]


def test_labels_validates_shapes() -> None:
    with pytest.raises(ValueError, match="multilabel y must be"):
        Labels("multilabel", ("a", "b"), np.zeros((3, 1), np.float32), np.ones((3, 1), bool))
    with pytest.raises(ValueError, match="mask must be bool"):
        Labels("multiclass", ("a", "b"), np.zeros(3, np.int64), np.ones(3, np.int64))
