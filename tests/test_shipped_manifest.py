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
    assert shipped.classes == generated.classes
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


def _commented_entries(text: str) -> dict[str, str]:
    """``name -> YAML`` of every commented dataset entry (``  # name:`` and the lines under it
    indented deeper, comment marks removed)."""
    entries: dict[str, str] = {}
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if not (line.startswith("  # ") and line.rstrip().endswith(":")):
            continue
        name = line[4:].rstrip()[:-1]
        if " " in name or not name:
            continue
        body = []
        for nxt in lines[i + 1 :]:
            if not nxt.startswith("  #   "):
                break
            body.append(nxt[6:])
        if body:
            entries[name] = "\n".join(body)
    return entries


def test_every_commented_entry_is_a_valid_entry_once_uncommented(tmp_path: Path) -> None:
    """The commented entries are templates users uncomment: each must parse as written (with
    its `images` / `index` pointed at a stand-in), and each dataset a shipped pipeline names has
    one (or is the demo, or is named in the comment saying no entry is shipped)."""
    text = (ROOT / "data_manifest.yaml").read_text()
    entries = _commented_entries(text)
    assert {"nih-cxr14", "btcv", "montgomery", "sars-cov-2-ct", "msd-heart"} <= set(entries)
    for name, body in entries.items():
        entry = yaml.safe_load(body)
        entry["images"], entry["index"] = str(tmp_path), str(tmp_path / "index.csv")
        manifest = tmp_path / f"{name}.yaml"
        manifest.write_text(yaml.safe_dump({"datasets": {name: entry}}))
        load_manifest(manifest).dataset(name)  # raises ManifestError on a bad template
    from embedkit.study.pipeline import load_pipeline

    for path in sorted((ROOT / "pipelines").glob("*.yaml")):
        spec = load_pipeline(path).spec
        named = set(spec.datasets) | {d for b in spec.blocks for d in b.datasets or ()}
        for name in named - set(entries) - {"demo"}:
            assert f"({name})" in text or f"`{name}`" in text, (path.name, name)
