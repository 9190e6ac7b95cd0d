"""Pipelines: every shipped file validates; the demo study runs end to end and resumes."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import yaml
from rich.console import Console

from embedkit.data.demo import DemoSpec, generate_demo
from embedkit.errors import ConfigError
from embedkit.results.consistency import MixedResultsError
from embedkit.store.layout import COMPLETE_FILE
from embedkit.study.demodata import demo_dataset_config
from embedkit.study.pipeline import expand, load_pipeline, run_pipeline

ROOT = Path(__file__).resolve().parents[2]
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


def test_the_radiology_study_covers_ct_mri_and_segmentation() -> None:
    """The DINOv2-for-radiology study: X-ray and MRI images, CT volumes pooled mean and max,
    2D and 3D segmentation frozen and finetuned, against supervised, MAE and CLIP baselines."""
    steps = expand(load_pipeline(ROOT / "pipelines" / "dinov2_radiology.yaml"))
    by_block: dict[str, set[str]] = {}
    for s in steps:
        by_block.setdefault(s.block, set()).add(s.dataset)
    assert {"brain-tumor-mri", "nih-cxr14"} <= by_block["frozen"]
    assert by_block["frozen-volumes"] == {"sars-cov-2-ct"}
    assert {"montgomery", "btcv", "msd-heart"} <= by_block["frozen-segmentation"]
    assert by_block["finetuned-segmentation"] == by_block["frozen-segmentation"]
    pooled = {
        s.request().volume_pooling
        for s in steps
        if s.block == "frozen-volumes" and s.what == "probe linear"
    }
    assert pooled == {"mean", "max"}
    assert {s.what for s in steps if s.block == "frozen-segmentation"} == {
        "extract",
        "probe segmentation",
    }
    assert {"mae/vit-large16", "clip/vit-large14", "imagenet/vit-base16"} <= {
        s.model for s in steps
    }


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
    with pytest.raises(ConfigError, match=r"blocks\[0\]\.models\[0\]: .*did you mean"):
        load_pipeline(_write(tmp_path, _doc(models=["dinov3/vitb61"])))
    with pytest.raises(ConfigError, match=r"blocks\[0\]\.resolutions\[0\]: .*nearest valid"):
        load_pipeline(
            _write(tmp_path, _doc(models=["dinov2/base"], extract={"snap_resolution": False},
                                  resolutions=[512]))
        )  # fmt: skip
    with pytest.raises(ConfigError, match=r"probes\[0\]\.kind: 'knnn' .*did you mean 'knn'"):
        load_pipeline(_write(tmp_path, _doc(probes=[{"kind": "knnn"}])))
    with pytest.raises(ConfigError, match=r"not valid YAML|file not found"):
        load_pipeline(tmp_path / "missing.yaml")


def test_every_bad_name_is_reported_at_once_with_its_key(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        _doc(
            models=["test/tiny-dinov3-vit", "dinov3/vitb61", "test/tiny-dinov2"],
            resolutions=[224, 300],
            extract={"snap_resolution": False},
            probes=[{"kind": "linear", "pooling": "clss"}],
            finetune=[
                {"method": "lroa"},
                {"method": "lora", "options": {"lora_rank": 8}},
                {"method": "bitfit", "options": {"warmup": 2.0}},
            ],
        ),
    )
    with pytest.raises(ConfigError) as caught:
        load_pipeline(path)
    message = str(caught.value)
    expected = [
        "blocks[0].models[1]: ",  # unknown model
        "blocks[0].resolutions[1]: ",  # 300 is not a multiple of 16 (ViT) nor of 14 (DINOv2)
        "blocks[0].probes[0].pooling: 'clss' is not stored",
        "blocks[0].finetune[0].method: unknown finetuning method 'lroa'; did you mean 'lora'",
        "blocks[0].finetune[1].options.lora_rank: unknown option; did you mean 'lora_r'",
        "blocks[0].finetune[2].options: Expected epochs >= 1",
    ]
    for part in expected:
        assert part in message, (part, message)
    doc = _doc()
    doc["compare"] = [{"axis": "model", "a": "dinov3/vitb61", "b": "dinov2/base"},
                      {"axis": "resolution", "a": 512}]  # fmt: skip
    with pytest.raises(ConfigError) as caught:
        load_pipeline(_write(tmp_path, doc))
    assert "compare[0]: " in str(caught.value) and "did you mean" in str(caught.value)
    assert "compare[1]: Expected both values of a pair or neither" in str(caught.value)
    assert message.count(str(path)) >= len(expected)  # every line names the file


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A manifest whose demo dataset is still to be generated, and pipelines/demo.yaml with
    smaller demo data (20 patients of 96 px): the run generates the images itself."""
    folder = tmp_path_factory.mktemp("study")
    (folder / "data").mkdir()
    manifest = {"cache": "../cache", "datasets": {"demo": demo_dataset_config()}}
    (folder / "data" / "manifest.yaml").write_text(yaml.safe_dump(manifest))
    doc = yaml.safe_load((ROOT / "pipelines" / "demo.yaml").read_text())
    doc["demo_data"].update(patients=20, size=96)
    doc["compare"] = [{"axis": "method", "a": "linear", "b": "finetune-lora"},
                      {"axis": "resolution", "a": 512, "b": 224}]  # fmt: skip
    for block in doc["blocks"]:
        block.get("extract", {})["workers"] = 0
        for step in block.get("finetune", []):
            step["options"]["num_workers"] = 0
    (folder / "demo.yaml").write_text(yaml.safe_dump(doc))
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
    console = Console(width=200, record=True)
    summary = run_pipeline(
        study / "demo.yaml", manifest=study / "data" / "manifest.yaml",
        results=study / "results", dry_run=True, console=console,
    )  # fmt: skip
    assert {s.status for s in summary.steps} == {"to run"}
    text = console.export_text()
    assert "demo data: 60 synthetic images" in text and "(to generate)" in text
    assert not (study / "data" / "index.csv").exists()  # a dry run generates nothing
    assert not (study / "cache").exists() and not (study / "results").exists()
    extracts = [s for s in summary.steps if s.action == "extract"]
    # frozen at 224 and 512 px; patch tokens for the segmentation probe at 224 px
    assert [s.resolution for s in extracts] == [224, 512, 224]
    assert all(s.estimate.startswith("60 img x") for s in extracts)  # counted from demo_data
    assert [s.what for s in summary.steps if s.action == "finetune"] == ["finetune lora"]
    assert [s.block for s in summary.steps if s.what == "probe segmentation"] == ["segmentation"]


@pytest.mark.slow
def test_demo_pipeline_generates_its_data_runs_end_to_end_then_skips_everything(
    study: Path,
) -> None:
    first = _run(study, local_cache=str(study / "local"))  # probes read through local copies
    assert not first.failed, [(s.what, s.error) for s in first.failed]  # type: ignore[attr-defined]
    images = [p for p in (study / "data" / "images").rglob("*.png") if "_mask" not in p.name]
    assert len(images) == 60
    copies = sorted(p.relative_to(study / "local") for p in (study / "local").glob("*/*/*.zarr"))
    assert copies == sorted(
        p.relative_to(study / "cache") for p in (study / "cache").glob("*/*/*.zarr")
    )
    assert len(copies) == 3 and all(  # 224 and 512 px, and 224 px with patch tokens
        (study / "local" / c / COMPLETE_FILE).is_file() for c in copies
    )
    assert (study / "report" / "report.html").is_file()
    records = list((study / "results").rglob("*.json"))
    assert len(records) == 8  # 2 resolutions x 3 probe kinds + segmentation + 1 LoRA finetune
    again = _run(study)
    assert {s.status for s in again.steps} == {"cached", "done"}  # type: ignore[attr-defined]
    assert len(list((study / "results").rglob("*.json"))) == 8
    with (study / "report" / "comparisons.csv").open() as fh:
        pairs = sorted((r["axis"], r["a"], r["b"]) for r in csv.DictReader(fh))
    vit = "test/tiny-dinov3-vit"
    assert pairs == [  # only the chosen comparisons; probe vs finetune on the same test images
        ("method", f"{vit} · 224px · linear", f"{vit} · 224px · finetune-lora"),
        ("resolution", f"{vit} · 512px · knn", f"{vit} · 224px · knn"),
        ("resolution", f"{vit} · 512px · linear", f"{vit} · 224px · linear"),
    ]

    # The same results folder with a manifest that defines another 'demo' (another split):
    # refused before anything runs, naming the dataset and the fix.
    other = yaml.safe_load((study / "data" / "manifest.yaml").read_text())
    other["datasets"]["demo"]["splits"]["seed"] = 1
    (study / "data" / "other.yaml").write_text(yaml.safe_dump(other))
    with pytest.raises(MixedResultsError, match=r"dataset 'demo'.*test split"):
        run_pipeline(
            study / "demo.yaml", manifest=study / "data" / "other.yaml",
            results=study / "results", report=study / "report2", console=Console(record=True),
        )  # fmt: skip
    assert len(list((study / "results").rglob("*.json"))) == 8 and not (study / "report2").exists()


def test_demo_data_of_another_size_is_refused(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    manifest = {"datasets": {"demo": demo_dataset_config()}}
    (tmp_path / "data" / "manifest.yaml").write_text(yaml.safe_dump(manifest))
    generate_demo(tmp_path / "data", DemoSpec(n_patients=2, images_per_patient=1, size=64))
    doc = _doc()
    doc["demo_data"] = {"patients": 2, "images_per_patient": 1, "size": 96}
    with pytest.raises(ConfigError, match=r"holds demo data generated with .*'size': 64"):
        run_pipeline(_write(tmp_path, doc), manifest=tmp_path / "data" / "manifest.yaml",
                     results=tmp_path / "r", console=Console(record=True))  # fmt: skip


def test_datasets_missing_from_the_manifest_are_named_with_their_keys(tmp_path: Path) -> None:
    (tmp_path / "manifest.yaml").write_text(
        yaml.safe_dump({"datasets": {"demo": demo_dataset_config()}})
    )
    doc = _doc()
    doc["datasets"] = ["demo", "dmeo"]
    doc["blocks"][0]["datasets"] = ["chexpert"]  # type: ignore[index]
    with pytest.raises(ConfigError) as caught:
        run_pipeline(_write(tmp_path, doc), manifest=tmp_path / "manifest.yaml",
                     console=Console(record=True))  # fmt: skip
    message = str(caught.value)
    assert "datasets[1]: dataset 'dmeo' is not in" in message and "did you mean 'demo'" in message
    assert "blocks[0].datasets[0]: dataset 'chexpert'" in message


def test_every_problem_of_a_pipeline_is_reported_at_once(tmp_path: Path) -> None:
    """A schema error (an unknown probe kind) does not hide a model typo in the same file."""
    doc = _doc(models=["dinov3/vitb61"], probes=[{"kind": "linaer"}])
    with pytest.raises(ConfigError) as info:
        load_pipeline(_write(tmp_path, doc))
    message = str(info.value)
    assert "linaer" in message
    assert "blocks[0].models[0]" in message and "did you mean 'dinov3/vitb16'" in message


def test_a_run_reports_name_and_dataset_problems_in_one_round(tmp_path: Path) -> None:
    (tmp_path / "manifest.yaml").write_text(
        yaml.safe_dump({"datasets": {"demo": demo_dataset_config()}})
    )
    doc = _doc(models=["dinov3/vitb61"])
    doc["datasets"] = ["dmeo"]
    doc["manifest"] = "manifest.yaml"
    with pytest.raises(ConfigError) as caught:
        run_pipeline(_write(tmp_path, doc), console=Console(record=True))
    message = str(caught.value)
    assert "blocks[0].models[0]: unknown model 'dinov3/vitb61'" in message
    assert "datasets[0]: dataset 'dmeo' is not in" in message and "did you mean 'demo'" in message
