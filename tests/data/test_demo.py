"""The synthetic demo dataset: deterministic, resumable, in the format the manifest expects."""

from __future__ import annotations

import csv
import hashlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from embedkit.data.demo import FINDINGS, INDEX_COLUMNS, DemoSpec, generate_demo


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
    plain = _draw(anatomy, set(), 256, np.random.default_rng(2))
    big_heart = _draw(anatomy, {"Cardiomegaly"}, 256, np.random.default_rng(2))
    heart_band = (slice(150, 170), slice(95, 110))  # beside a normal heart, inside the lung
    assert big_heart[heart_band].mean() > plain[heart_band].mean() + 0.02


def test_bad_spec_is_rejected() -> None:
    with pytest.raises(ValueError, match="Expected an image size"):
        DemoSpec(size=10)
