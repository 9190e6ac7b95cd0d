"""Parsing data_manifest.yaml: typed config, resolved paths, and errors worded for people."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from embedkit.errors import ManifestError
from embedkit.manifest import (
    ColumnsLabels,
    FilesSplits,
    GivenSplits,
    SeparatedLabels,
    SingleLabels,
    load_manifest,
)

from .conftest import WriteManifest, nih_entry

REPO = Path(__file__).resolve().parents[2]


def test_paths_resolve_against_manifest_folder_and_cache_default(
    write_manifest: WriteManifest, tmp_path: Path
) -> None:
    manifest = load_manifest(write_manifest())
    config = manifest.dataset("demo")
    assert config.images == tmp_path / "images"
    assert config.index == tmp_path / "index.csv"
    assert manifest.cache == str(tmp_path / "embedkit-cache")
    assert isinstance(config.labels, SeparatedLabels)
    assert config.labels.names == ("Nodule", "Cardiomegaly", "Effusion", "Pneumothorax")
    assert config.name == "demo"


@pytest.mark.parametrize(
    ("cache", "expected"),
    [
        ("s3://bucket/prefix", "s3://bucket/prefix"),
        ("memory://x", "memory://x"),
        ("/abs/c", "/abs/c"),
    ],
)
def test_cache_urls_and_absolute_paths_kept(tmp_path: Path, cache: str, expected: str) -> None:
    path = tmp_path / "m.yaml"
    path.write_text(yaml.safe_dump({"cache": cache, "datasets": {"demo": nih_entry()}}))
    assert load_manifest(path).cache == expected


def test_manifest_is_frozen(write_manifest: WriteManifest) -> None:
    manifest = load_manifest(write_manifest())
    with pytest.raises(AttributeError):
        manifest.cache = "x"  # type: ignore[misc]
    with pytest.raises(TypeError):
        manifest.datasets["other"] = manifest.dataset("demo")  # type: ignore[index]


def test_missing_manifest_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ManifestError, match=r"nope\.yaml: manifest file not found"):
        load_manifest(tmp_path / "nope.yaml")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ManifestError, match=r"data_manifest\.yaml: manifest file not found"):
        load_manifest()


def test_default_path_is_data_manifest_in_cwd(
    write_manifest: WriteManifest, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    write_manifest()
    monkeypatch.chdir(tmp_path)
    assert load_manifest().path == tmp_path / "data_manifest.yaml"


def test_unknown_dataset_suggests(write_manifest: WriteManifest) -> None:
    manifest = load_manifest(write_manifest(name="nih-cxr14"))
    with pytest.raises(ManifestError, match=r"no dataset 'nih-cxr1'; did you mean 'nih-cxr14'\?"):
        manifest.dataset("nih-cxr1")


def test_unknown_field_names_file_location_and_suggestion(write_manifest: WriteManifest) -> None:
    entry = nih_entry()
    entry["labels"]["seperator"] = entry["labels"].pop("separator")
    path = write_manifest(entry, name="nih-cxr14")
    with pytest.raises(ManifestError) as info:
        load_manifest(path)
    message = str(info.value)
    assert (
        f"{path}: datasets.nih-cxr14.labels.seperator: unknown field; did you mean 'separator'?"
        in message
    )
    assert "Valid fields: format, column, separator, negative, names, ignore_unknown" in message
    assert "extra_forbidden" not in message
    assert "pydantic" not in message


def test_unknown_top_level_and_split_keys(write_manifest: WriteManifest, tmp_path: Path) -> None:
    entry = nih_entry(splits={"method": "patient", "fractions": {"train": 0.8, "tset": 0.2}})
    path = write_manifest(entry)
    with pytest.raises(ManifestError) as info:
        load_manifest(path)
    message = str(info.value)
    assert "datasets.demo.splits.fractions.tset: unknown field; did you mean 'test'?" in message
    assert "datasets.demo.splits.fractions.test: required field is missing" in message
    assert "2 problems" in message

    bad = tmp_path / "top.yaml"
    bad.write_text(yaml.safe_dump({"cahce": "x", "datasets": {"demo": nih_entry()}}))
    with pytest.raises(ManifestError, match=r"cahce: unknown field; did you mean 'cache'\?"):
        load_manifest(bad)


def test_missing_and_wrong_type_fields(write_manifest: WriteManifest) -> None:
    with pytest.raises(
        ManifestError, match=r"datasets\.demo\.id_column: required field is missing"
    ):
        load_manifest(write_manifest(nih_entry(id_column=None)))
    entry = nih_entry(
        splits={"method": "patient", "fractions": {"train": 0.8, "test": 0.2}, "seed": "abc"}
    )
    with pytest.raises(
        ManifestError,
        match=r"datasets\.demo\.splits\.seed: expected a valid integer.*got str 'abc'",
    ):
        load_manifest(write_manifest(entry))


def test_bad_choice_of_format_and_policy(write_manifest: WriteManifest) -> None:
    entry = nih_entry(labels={"format": "separate", "column": "findings"})
    with pytest.raises(
        ManifestError,
        match=r"labels\.format: 'separate' is not a valid choice; did you mean 'separated'\?",
    ):
        load_manifest(write_manifest(entry))
    entry = nih_entry(labels={"format": "columns", "columns": ["a"], "uncertain": "ignored"})
    with pytest.raises(
        ManifestError,
        match=r"labels\.uncertain: 'ignored' is not a valid choice; did you mean 'ignore'\?",
    ):
        load_manifest(write_manifest(entry))
    entry = nih_entry(labels={"column": "findings"})
    with pytest.raises(
        ManifestError, match=r"datasets\.demo\.labels\.format: required field is missing"
    ):
        load_manifest(write_manifest(entry))


@pytest.mark.parametrize(
    ("fractions", "pattern"),
    [
        ({"train": 0.7, "val": 0.1, "test": 0.1}, r"fractions sum to 0\.9 .*must sum to 1"),
        (
            {"train": 1.2, "val": -0.2, "test": 0.0},
            r"splits\.fractions\.val: expected greater than or equal to 0",
        ),
    ],
)
def test_fractions_must_sum_to_one_and_be_non_negative(
    write_manifest: WriteManifest, fractions: dict[str, float], pattern: str
) -> None:
    entry = nih_entry(splits={"method": "patient", "fractions": fractions})
    with pytest.raises(ManifestError, match=pattern):
        load_manifest(write_manifest(entry))


def test_val_may_be_zero_or_omitted(write_manifest: WriteManifest) -> None:
    entry = nih_entry(splits={"method": "patient", "fractions": {"train": 0.8, "test": 0.2}})
    splits = load_manifest(write_manifest(entry)).dataset("demo").splits
    assert splits.method == "patient"
    assert splits.fractions.val == 0.0


def test_yaml_scalars_that_are_not_text(write_manifest: WriteManifest) -> None:
    entry = nih_entry(filters={"view": ["PA", "no"]})  # YAML 1.1: `no` is False
    path = write_manifest(entry)
    path.write_text(path.read_text().replace("- 'no'", "- no"))
    with pytest.raises(ManifestError, match=r"filters: YAML read False as a bool; quote it"):
        load_manifest(path)
    entry = nih_entry(labels={"format": "single", "column": "findings", "classes": [0, 1]})
    labels = load_manifest(write_manifest(entry)).dataset("demo").labels
    assert isinstance(labels, SingleLabels)
    assert labels.format == "single"
    assert labels.classes == ("0", "1")


def test_duplicate_yaml_keys_refused(tmp_path: Path) -> None:
    path = tmp_path / "m.yaml"
    path.write_text("datasets:\n  a: {}\n  a: {}\n")
    with pytest.raises(ManifestError, match=r"not valid YAML: line 3, column 3: duplicate key 'a'"):
        load_manifest(path)


def test_negative_token_inside_names_and_duplicate_names(write_manifest: WriteManifest) -> None:
    labels = {
        "format": "separated",
        "column": "findings",
        "negative": "No Finding",
        "names": ["No Finding", "Effusion"],
    }
    with pytest.raises(ManifestError, match=r"negative token 'No Finding' is also in names"):
        load_manifest(write_manifest(nih_entry(labels=labels)))
    labels = {"format": "columns", "columns": ["Edema", "Edema"]}
    with pytest.raises(ManifestError, match=r"columns lists \['Edema'\] more than once"):
        load_manifest(write_manifest(nih_entry(labels=labels)))


def test_index_suffix_and_url_paths_refused(write_manifest: WriteManifest) -> None:
    with pytest.raises(ManifestError, match=r"'index\.xlsx' is not a supported index file"):
        load_manifest(write_manifest(nih_entry(index="index.xlsx")))
    with pytest.raises(ManifestError, match=r"datasets\.demo\.images: 's3://b/i' is a URL"):
        load_manifest(write_manifest(nih_entry(images="s3://b/i")))


def test_given_and_files_splits_parse(write_manifest: WriteManifest, tmp_path: Path) -> None:
    given = {
        "method": "given",
        "column": "view",
        "values": {"train": "PA", "val": [], "test": ["AP", "LL"]},
    }
    splits = load_manifest(write_manifest(nih_entry(splits=given))).dataset("demo").splits
    assert isinstance(splits, GivenSplits)
    assert splits.values.lookup() == {"PA": "train", "AP": "test", "LL": "test"}
    files = {"method": "files", "train": "splits/train.txt", "test": "splits/test.txt"}
    splits = load_manifest(write_manifest(nih_entry(splits=files))).dataset("demo").splits
    assert isinstance(splits, FilesSplits)
    assert splits.files() == {
        "train": tmp_path / "splits/train.txt",
        "test": tmp_path / "splits/test.txt",
    }


def test_columns_defaults(write_manifest: WriteManifest) -> None:
    labels = (
        load_manifest(write_manifest(nih_entry(labels={"format": "columns", "columns": ["Edema"]})))
        .dataset("demo")
        .labels
    )
    assert isinstance(labels, ColumnsLabels)
    assert (labels.uncertain, labels.blank) == ("ignore", "negative")


def _uncomment_entries(text: str) -> str:
    """Turn the commented-out dataset entries of data_manifest.yaml into live YAML."""
    out: list[str] = []
    inside = False
    for line in text.splitlines():
        if re.match(r"^  # [a-z0-9.-]+:\s*$", line):
            inside = True
            out.append("  " + line[4:])
        elif inside and line.startswith("  #   "):
            out.append("  " + line[4:])
        else:
            inside = False
            out.append(line)
    return "\n".join(out) + "\n"


def test_shipped_manifest_parses_with_demo_first() -> None:
    manifest = load_manifest(REPO / "data_manifest.yaml")
    assert next(iter(manifest.datasets)) == "demo"
    demo = manifest.dataset("demo")
    assert demo.id_column == "image_id"
    assert demo.path_column == "path"
    assert demo.patient_column == "patient_id"
    assert demo.images == REPO / "embedkit-demo" / "images"
    assert manifest.cache == str(REPO / "embedkit-cache")


def test_shipped_commented_public_entries_validate(tmp_path: Path) -> None:
    text = _uncomment_entries((REPO / "data_manifest.yaml").read_text())
    path = tmp_path / "all.yaml"
    path.write_text(text)
    manifest = load_manifest(path)
    assert {"nih-cxr14", "chexpert", "mimic-cxr", "vindr-cxr", "padchest", "rsna-pneumonia"} <= set(
        manifest.datasets
    )
    nih = manifest.dataset("nih-cxr14").labels
    assert isinstance(nih, SeparatedLabels)
    assert nih.names is not None
    assert len(nih.names) == 14
