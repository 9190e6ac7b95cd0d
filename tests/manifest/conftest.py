"""Helpers for manifest tests: write a small index and a manifest next to it in tmp_path."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

NIH_CSV = """\
image_id,path,patient_id,findings,view
a1,p1/a1.png,p1,No Finding,PA
a2,p1/a2.png,p1,Effusion|Nodule,PA
a3,p2/a3.png,p2,Cardiomegaly,AP
a4,p3/a4.png,p3,Pneumothorax,LL
a5,p4/a5.png,p4,No Finding,PA
a6,p5/a6.png,p5,Effusion,PA
"""


def nih_entry(**changes: Any) -> dict[str, Any]:
    """A demo-style dataset entry; ``changes`` replace top-level keys (None removes one)."""
    entry: dict[str, Any] = {
        "images": "./images",
        "index": "./index.csv",
        "id_column": "image_id",
        "path_column": "path",
        "patient_column": "patient_id",
        "labels": {
            "format": "separated",
            "column": "findings",
            "separator": "|",
            "negative": "No Finding",
            "names": ["Nodule", "Cardiomegaly", "Effusion", "Pneumothorax"],
        },
        "splits": {"method": "patient", "fractions": {"train": 0.6, "val": 0.2, "test": 0.2}},
    }
    for key, value in changes.items():
        if value is None:
            entry.pop(key, None)
        else:
            entry[key] = value
    return entry


WriteManifest = Callable[..., Path]


@pytest.fixture
def write_manifest(tmp_path: Path) -> WriteManifest:
    """``write_manifest(entry, csv=..., name="demo", extra_files={...})`` → the manifest path."""

    def write(
        entry: dict[str, Any] | None = None,
        *,
        csv: str | None = NIH_CSV,
        name: str = "demo",
        files: dict[str, str] | None = None,
    ) -> Path:
        if csv is not None:
            (tmp_path / "index.csv").write_text(csv)
        for rel, text in (files or {}).items():
            (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / rel).write_text(text)
        path = tmp_path / "data_manifest.yaml"
        document = {"datasets": {name: entry if entry is not None else nih_entry()}}
        path.write_text(yaml.safe_dump(document, sort_keys=False))
        return path

    return write
