"""The shipped data_manifest.yaml and `embedkit demo` describe the same demo dataset."""

from __future__ import annotations

from pathlib import Path

import yaml

from embedkit.manifest import load_manifest
from embedkit.study.demodata import demo_dataset_config

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


def test_the_demo_pipeline_writes_where_the_demo_command_does() -> None:
    """`embedkit demo` from the repository root and `embedkit run pipelines/demo.yaml` use the
    same manifest, demo folder, results and report."""
    from embedkit.study.demo import DEMO_PIPELINE
    from embedkit.study.demodata import demo_folder
    from embedkit.study.pipeline import load_pipeline

    pipe = load_pipeline(ROOT / "pipelines" / "demo.yaml")
    assert pipe.path == DEMO_PIPELINE
    assert pipe.spec.demo_data is not None and pipe.spec.demo_data.dataset == "demo"
    assert Path(pipe.resolve_path(pipe.spec.manifest)) == ROOT / "data_manifest.yaml"
    shipped = load_manifest(ROOT / "data_manifest.yaml").dataset("demo")
    folder = demo_folder(shipped)
    assert folder == ROOT / "embedkit-demo"
    assert Path(pipe.resolve_path(pipe.spec.results)) == folder / "results"
    assert Path(pipe.resolve_path(pipe.spec.report)) == folder / "report"
