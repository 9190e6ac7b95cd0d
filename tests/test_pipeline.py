"""Pipelines: every shipped file validates; the demo study runs end to end and resumes."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml
from rich.console import Console

from embedkit.data.demo import DemoSpec, generate_demo
from embedkit.demo import demo_dataset_config
from embedkit.errors import ConfigError, ResolutionError, UnknownModelError
from embedkit.pipeline import expand, load_pipeline, run_pipeline

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted((ROOT / "pipelines").glob("*.yaml"))


@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_every_shipped_pipeline_loads_and_validates(path: Path) -> None:
    pipeline = load_pipeline(path)
    steps = expand(pipeline)
    assert steps and pipeline.spec.name
    assert {s.action for s in steps} <= {"extract", "probe", "finetune"}


def test_the_cxr_study_design_is_complete() -> None:
    steps = expand(load_pipeline(ROOT / "pipelines" / "cxr_resolution_scaling.yaml"))
    assert len({s.dataset for s in steps}) == 7
    assert {s.resolution for s in steps} == {224, 512, 1024}
    frozen = {(s.model, s.what) for s in steps if s.block == "frozen-7b"}
    assert frozen == {("dinov3/vit7b16", "extract"), ("dinov3/vit7b16", "probe linear")}
    tuned = {s.model for s in steps if s.action == "finetune"}
    assert {"dinov3/vitb16", "dinov3/convnext-base", "dinov2/base"} <= tuned


def _write(tmp_path: Path, doc: dict[str, object]) -> Path:
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def _doc(**block: object) -> dict[str, object]:
    base: dict[str, object] = {
        "name": "b",
        "models": ["test/tiny-dinov3-vit"],
        "resolutions": [224],
    }
    base.update(block)
    return {"name": "x", "datasets": ["demo"], "blocks": [base]}


def test_bad_pipelines_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="did you mean 'resolutions'"):
        load_pipeline(_write(tmp_path, _doc(resolution=[224], resolutions=None)))
    with pytest.raises(UnknownModelError, match="did you mean"):
        load_pipeline(_write(tmp_path, _doc(models=["dinov3/vitb61"])))
    with pytest.raises(ResolutionError, match="nearest valid"):
        load_pipeline(
            _write(tmp_path, _doc(models=["dinov2/base"], extract={"snap_resolution": False},
                                  resolutions=[512]))
        )  # fmt: skip
    with pytest.raises(ConfigError, match=r"not valid YAML|file not found"):
        load_pipeline(tmp_path / "missing.yaml")


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Demo data (20 patients, 96 px) with a manifest, and a copy of pipelines/demo.yaml."""
    folder = tmp_path_factory.mktemp("study")
    generate_demo(folder / "data", DemoSpec(n_patients=20, images_per_patient=3, size=96))
    manifest = {"cache": "../cache", "datasets": {"demo": demo_dataset_config()}}
    (folder / "data" / "manifest.yaml").write_text(yaml.safe_dump(manifest))
    shutil.copy(ROOT / "pipelines" / "demo.yaml", folder / "demo.yaml")
    return folder


def _run(study: Path, **kw: object) -> object:
    return run_pipeline(
        study / "demo.yaml",
        manifest=study / "data" / "manifest.yaml",
        results=study / "results",
        report=study / "report",
        console=Console(width=200, record=True),
        **kw,  # type: ignore[arg-type]
    )


def test_demo_pipeline_dry_run_plans_without_running(study: Path) -> None:
    summary = _run(study, dry_run=True)
    statuses = {s.status for s in summary.steps}  # type: ignore[attr-defined]
    assert statuses == {"to run"}
    assert not (study / "cache").exists() and not (study / "results").exists()
    extracts = [s for s in summary.steps if s.action == "extract"]  # type: ignore[attr-defined]
    assert len(extracts) == 4 and all("GFLOP" in s.estimate for s in extracts)
    assert [s.what for s in summary.steps if s.action == "finetune"] == ["finetune lora"]  # type: ignore[attr-defined]


@pytest.mark.slow
def test_demo_pipeline_runs_end_to_end_then_skips_everything(study: Path) -> None:
    first = _run(study, local_cache=str(study / "local"))  # probes read through local copies
    assert not first.failed, [(s.what, s.error) for s in first.failed]  # type: ignore[attr-defined]
    copies = sorted(p.relative_to(study / "local") for p in (study / "local").glob("*/*/*.zarr"))
    assert copies == sorted(
        p.relative_to(study / "cache") for p in (study / "cache").glob("*/*/*.zarr")
    )
    assert len(copies) == 4 and all(
        (study / "local" / c / "COMPLETE.json").is_file() for c in copies
    )
    assert (study / "report" / "report.html").is_file()
    records = list((study / "results").rglob("*.json"))
    assert len(records) == 13  # 2 models x 2 resolutions x 3 probe kinds + 1 LoRA finetune
    again = _run(study)
    assert {s.status for s in again.steps} == {"cached", "done"}  # type: ignore[attr-defined]
    assert len(list((study / "results").rglob("*.json"))) == 13
    comparisons = (study / "report" / "comparisons.md").read_text()
    assert "finetune-lora" in comparisons  # probe vs finetune on the same test images
