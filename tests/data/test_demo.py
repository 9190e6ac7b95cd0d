"""The synthetic demo dataset: deterministic, resumable, in the format the manifest expects;
the demo command's data step and options on the demo pipeline."""

from __future__ import annotations

import csv
import hashlib
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from embedkit.data.demo import FINDINGS, INDEX_COLUMNS, DemoSpec, generate_demo
from embedkit.errors import ConfigError
from embedkit.manifest import DatasetConfig, load_manifest


def _digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("demo")
    generate_demo(out, DemoSpec(n_patients=8, images_per_patient=3, size=128))
    return out


def test_index_has_the_manifest_columns_and_one_row_per_image(demo_dir: Path) -> None:
    with (demo_dir / "index.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert tuple(rows[0]) == INDEX_COLUMNS
    assert len(rows) == 24
    assert len({r["image_id"] for r in rows}) == 24
    assert len({r["patient_id"] for r in rows}) == 8
    for r in rows:
        assert (demo_dir / "images" / r["path"]).is_file()
        tokens = r["findings"].split("|")
        assert tokens == ["No Finding"] or set(tokens) <= set(FINDINGS)


def test_images_are_8_and_16_bit_pngs_of_the_requested_size(demo_dir: Path) -> None:
    modes = set()
    for p in (demo_dir / "images").rglob("*.png"):
        with Image.open(p) as im:
            assert im.size == (128, 128)
            modes.add(np.asarray(im).dtype)
    assert modes == {np.dtype(np.uint8), np.dtype(np.uint16)}


def test_generation_is_deterministic(demo_dir: Path, tmp_path: Path) -> None:
    generate_demo(tmp_path, DemoSpec(n_patients=8, images_per_patient=3, size=128))
    assert _digest(tmp_path) == _digest(demo_dir)


def test_generation_resumes_and_recreates_missing_images(demo_dir: Path, tmp_path: Path) -> None:
    spec = DemoSpec(n_patients=8, images_per_patient=3, size=128)
    generate_demo(tmp_path, spec)
    victim = next((tmp_path / "images").rglob("*.png"))
    victim.unlink()
    (tmp_path / "index.csv").unlink()
    generate_demo(tmp_path, spec)
    assert _digest(tmp_path) == _digest(demo_dir)


def test_findings_change_the_image() -> None:
    """Cardiomegaly enlarges the bright heart shadow: the image gets brighter at the heart."""
    from embedkit.data.demo import _anatomy, _draw

    anatomy = _anatomy(np.random.default_rng(1))
    plain = _draw(anatomy, set(), 256, np.random.default_rng(2))[0]
    big_heart = _draw(anatomy, {"Cardiomegaly"}, 256, np.random.default_rng(2))[0]
    heart_band = (slice(150, 170), slice(95, 110))  # beside a normal heart, inside the lung
    assert big_heart[heart_band].mean() > plain[heart_band].mean() + 0.02


def test_label_maps_follow_the_drawn_shapes(demo_dir: Path) -> None:
    """Each image has a label map of its size: lungs darker than the heart shadow, nodules
    (labelled only on images with a Nodule finding) brighter than the lung around them."""
    from embedkit.data.demo import MASK_CLASSES

    with (demo_dir / "index.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    nodules = 0
    for r in rows:
        with Image.open(demo_dir / "images" / r["path"]) as im:
            img = np.asarray(im, dtype=np.float64) / (65535.0 if im.mode.startswith("I") else 255.0)
        with Image.open(demo_dir / "images" / r["mask"]) as mk:
            assert mk.mode == "L"
            labels = np.asarray(mk)
        assert labels.shape == img.shape and labels.max() < len(MASK_CLASSES)
        lung, heart, nodule = (labels == 1), (labels == 2), (labels == 3)
        assert lung.mean() > 0.1 and heart.mean() > 0.01
        assert img[heart].mean() > img[lung].mean() + 0.1
        if nodule.any():
            assert "Nodule" in r["findings"]
            assert img[nodule].mean() > img[lung].mean()
            nodules += 1
    assert nodules > 0


def test_masks_are_added_to_data_from_before_them(demo_dir: Path, tmp_path: Path) -> None:
    """Demo data written before the masks existed: the images stay byte for byte, the masks
    are drawn, and the result equals fresh data."""
    spec = DemoSpec(n_patients=8, images_per_patient=3, size=128)
    generate_demo(tmp_path, spec)
    for mask in (tmp_path / "images").rglob("*_mask.png"):
        mask.unlink()
    before = _digest(tmp_path / "images")
    generate_demo(tmp_path, spec)
    after = _digest(tmp_path / "images")
    assert {k: v for k, v in after.items() if k in before} == before
    assert _digest(tmp_path) == _digest(demo_dir)


def test_bad_spec_is_rejected() -> None:
    with pytest.raises(ValueError, match="Expected an image size"):
        DemoSpec(size=10)


def _demo_config(folder: Path, **changes: object) -> DatasetConfig:
    from embedkit.study.demodata import demo_dataset_config

    doc = {"datasets": {"demo": {**demo_dataset_config(), **changes}}}
    (folder / "manifest.yaml").write_text(yaml.safe_dump(doc))
    return load_manifest(folder / "manifest.yaml").dataset("demo")


def test_ensure_demo_data_generates_once_and_refuses_another_spec(
    demo_dir: Path, tmp_path: Path
) -> None:
    from embedkit.study.demodata import ensure_demo_data

    spec = DemoSpec(n_patients=8, images_per_patient=3, size=128)
    config = _demo_config(tmp_path)
    assert ensure_demo_data(config, spec) is True
    assert _digest(tmp_path / "images") == _digest(demo_dir / "images")
    assert ensure_demo_data(config, spec) is False  # found: nothing rewritten
    with pytest.raises(ConfigError, match=r"generated with .*'size': 128.*delete the folder"):
        ensure_demo_data(config, DemoSpec(n_patients=9, images_per_patient=3, size=96))


def test_demo_data_from_before_the_spec_file_is_recognised(tmp_path: Path) -> None:
    from embedkit.study.demodata import ensure_demo_data

    spec = DemoSpec(n_patients=2, images_per_patient=2, size=64)
    generate_demo(tmp_path, spec)  # no demo-spec.json, as the demo command used to write
    config = _demo_config(tmp_path)
    assert ensure_demo_data(config, spec) is False
    with pytest.raises(ConfigError, match="'size': 64"):
        ensure_demo_data(config, DemoSpec(n_patients=2, images_per_patient=2, size=96))


def test_demo_data_needs_the_generator_layout(tmp_path: Path) -> None:
    from embedkit.study.demodata import ensure_demo_data

    config = _demo_config(tmp_path, images="pictures")
    with pytest.raises(ConfigError, match="cannot hold generated demo data"):
        ensure_demo_data(config, DemoSpec(n_patients=1, images_per_patient=1, size=64))


def test_demo_options_override_the_demo_pipeline() -> None:
    from embedkit.study.demo import demo_pipeline

    default = demo_pipeline()
    assert default.spec.demo_data is not None and default.spec.demo_data.size == 1024
    changed = demo_pipeline(patients=7, size=256, model="test/tiny-dinov2", resolutions=(112, 56),
                            workers=0)  # fmt: skip
    demo = changed.spec.demo_data
    assert demo is not None and (demo.patients, demo.size, demo.images_per_patient) == (7, 256, 3)
    frozen, segmentation, tuned = changed.spec.blocks
    assert frozen.models == segmentation.models == tuned.models == ("test/tiny-dinov2",)
    # what trains a network (finetuning, a head on patch tokens) runs at the smallest only
    assert frozen.resolutions == (112, 56)
    assert segmentation.resolutions == tuned.resolutions == (56,)
    assert frozen.extract.model_dump()["workers"] == 0
    assert tuned.finetune[0].model_dump()["options"]["num_workers"] == 0
    with pytest.raises(ConfigError, match=r"blocks\[0\]\.models\[0\]"):
        demo_pipeline(model="dinov3/vitb61")
