"""The demo dataset behind `embedkit demo` and pipelines that declare `demo_data:`: its manifest
entry and the resumable generation of its images into the folder that entry points at."""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from PIL import Image

from embedkit.data.demo import FINDINGS, MASK_CLASSES, DemoSpec, generate_demo
from embedkit.errors import ConfigError
from embedkit.manifest import DatasetConfig

__all__ = ["DEMO_DATASET", "demo_dataset_config", "demo_folder", "ensure_demo_data"]

DEMO_DATASET = "demo"
_SPEC_FILE = "demo-spec.json"


def demo_dataset_config() -> dict[str, object]:
    """The manifest entry of the demo dataset, with paths relative to the demo folder."""
    return {
        "images": "images",
        "index": "index.csv",
        "id_column": "image_id",
        "path_column": "path",
        "patient_column": "patient_id",
        "labels": {
            "format": "separated",
            "column": "findings",
            "separator": "|",
            "negative": "No Finding",
            "names": list(FINDINGS),
        },
        "splits": {
            "method": "patient",
            "fractions": {"train": 0.6, "val": 0.2, "test": 0.2},
            "seed": 0,
        },
        "classes": list(MASK_CLASSES),  # label maps in the index's `mask` column
    }


def demo_folder(config: DatasetConfig) -> Path:
    """Where the demo generator must write for ``config`` to read it: the index's folder,
    which must hold ``index.csv`` and ``images/`` (the layout :func:`generate_demo` writes)."""
    folder = Path(config.index).parent
    if Path(config.index).name != "index.csv" or Path(config.images) != folder / "images":
        raise ConfigError(
            f"dataset '{config.name}' cannot hold generated demo data: expected index "
            f"{folder / 'index.csv'} and images {folder / 'images'}, got index {config.index} "
            f"and images {config.images} instead; use the layout of demo_dataset_config()"
        )
    return folder


def _existing_spec(folder: Path) -> dict[str, Any] | None:
    """The spec of demo data already in ``folder`` (None: there is none yet)."""
    marker = folder / _SPEC_FILE
    if marker.is_file():
        return dict(json.loads(marker.read_text()))
    index = folder / "index.csv"
    if not index.is_file():
        return None
    with index.open(newline="") as fh:  # data written before the spec file existed
        rows = list(csv.DictReader(fh))
    if not rows:
        return None
    patients = {r["patient_id"] for r in rows}
    with Image.open(folder / "images" / rows[0]["path"]) as im:
        size = im.size[0]
    per_patient = len(rows) // max(len(patients), 1)
    return asdict(DemoSpec(n_patients=len(patients), images_per_patient=per_patient, size=size))


def _without_patients(spec: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in spec.items() if k != "n_patients"}


def ensure_demo_data(
    config: DatasetConfig,
    spec: DemoSpec,
    *,
    progress: Callable[[int, int], None] | None = None,
) -> bool:
    """Generate the demo images ``config`` points at, unless they are there; True if it wrote.

    Resumable (images on disk are kept, the index comes last). Another number of patients
    grows (or shrinks) the data in place: every patient's images come from a generator seeded
    by that patient alone, so the images on disk stay as they are (not rewritten: same bytes,
    same mtime, so a later extraction copies their features and computes only the new
    patients' images) and only the missing ones are drawn; the index then lists exactly the
    asked-for patients. Data of another image size, images per patient or seed in the same
    folder is refused rather than mixed: the spec is kept in ``demo-spec.json``.
    """
    folder = demo_folder(config)
    found = _existing_spec(folder)
    wanted = asdict(spec)
    if found is not None and found != wanted:
        if _without_patients(found) != _without_patients(wanted):
            raise ConfigError(
                f"{folder} holds demo data generated with {found}, not {wanted}; only the "
                "number of patients can change in place: delete the folder, or ask for the "
                "same size, images per patient and seed"
            )
        found = None  # another number of patients: draw the missing images, rewrite the index
    if found is not None and (folder / "index.csv").is_file():
        (folder / _SPEC_FILE).write_text(json.dumps(wanted))
        return False
    folder.mkdir(parents=True, exist_ok=True)
    (folder / _SPEC_FILE).write_text(json.dumps(wanted))
    generate_demo(folder, spec, progress=progress)
    return True
