"""The shipped data_manifest.yaml and `embedkit demo` describe the same demo dataset."""

from __future__ import annotations

from pathlib import Path

import yaml

from embedkit.demo import demo_dataset_config
from embedkit.manifest import load_manifest

ROOT = Path(__file__).resolve().parents[1]


def test_top_level_demo_entry_matches_the_demo_command(tmp_path: Path) -> None:
    shipped = load_manifest(ROOT / "data_manifest.yaml").dataset("demo")
    written = tmp_path / "manifest.yaml"
    written.write_text(yaml.safe_dump({"datasets": {"demo": demo_dataset_config()}}))
    generated = load_manifest(written).dataset("demo")
    assert shipped.labels == generated.labels
    assert shipped.splits == generated.splits
    assert (shipped.id_column, shipped.path_column, shipped.patient_column) == (
        generated.id_column,
        generated.path_column,
        generated.patient_column,
    )
    assert shipped.images == ROOT / "embedkit-demo" / "images"
    assert shipped.index == ROOT / "embedkit-demo" / "index.csv"
