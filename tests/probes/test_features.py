"""Features joined with manifest labels by image id, per split."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from embedkit.errors import CacheNotFoundError
from embedkit.extract import ExtractionRequest, extract
from embedkit.manifest import load_manifest
from embedkit.probes.features import split_features

from ..conftest import write_manifest


def _extract(manifest: Path, model_cache: Path, **kw: object) -> object:
    request = ExtractionRequest(
        model="test/tiny-dinov3-vit",
        dataset="demo",
        resolution=224,
        num_workers=0,
        unit_rows=8,
        **kw,  # type: ignore[arg-type]
    )
    return extract(request, manifest=manifest, model_cache_dir=model_cache).entry


def test_split_features_align_rows_ids_and_labels(demo_manifest: Path, model_cache: Path) -> None:
    entry = _extract(demo_manifest, model_cache)
    table = load_manifest(demo_manifest).dataset("demo").load()
    seen: set[str] = set()
    for split in ("train", "val", "test"):
        part = split_features(entry, table, split, "cls+mean")  # type: ignore[arg-type]
        rows = table.indices(split)
        assert part.ids == tuple(table.ids[r] for r in rows) and part.n_skipped == 0
        assert part.X.shape == (len(rows), 64) and part.X.dtype == np.float16
        np.testing.assert_array_equal(part.X, entry.read("cls+mean")[rows])  # type: ignore[attr-defined]
        np.testing.assert_array_equal(part.y, table.labels.y[rows])
        np.testing.assert_array_equal(part.mask, table.labels.mask[rows])
        assert not seen & set(part.patients)  # patient-wise splits stay patient-wise
        seen |= set(part.patients)


def test_skipped_images_are_left_out_and_counted(
    demo_data: Path, model_cache: Path, tmp_path: Path
) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(demo_data / "images", copy / "images")
    shutil.copy(demo_data / "index.csv", copy / "index.csv")
    manifest = write_manifest(copy, cache=str(tmp_path / "cache"))
    table = load_manifest(manifest).dataset("demo").load()
    victim = int(table.indices("train")[0])
    table.paths[victim].write_bytes(b"not a png")
    entry = _extract(manifest, model_cache, on_bad_image="skip")
    part = split_features(entry, table, "train", "cls")  # type: ignore[arg-type]
    assert part.n_skipped == 1 and table.ids[victim] not in part.ids
    assert len(part.ids) == len(table.indices("train")) - 1 == len(part.X) == len(part.y)


def test_entry_for_another_image_list_is_refused(
    demo_data: Path, demo_manifest: Path, model_cache: Path, tmp_path: Path
) -> None:
    entry = _extract(demo_manifest, model_cache)
    copy = tmp_path / "other"
    shutil.copytree(demo_data / "images", copy / "images")
    index = (demo_data / "index.csv").read_text().replace("P00000_00", "P00000_99")
    (copy / "images" / "P00000" / "P00000_00.png").rename(
        copy / "images" / "P00000" / "P00000_99.png"
    )
    (copy / "index.csv").write_text(index)
    table = load_manifest(write_manifest(copy, cache=str(tmp_path / "c"))).dataset("demo").load()
    split = str(table.split[table.ids.index("P00000_99")])
    with pytest.raises(CacheNotFoundError, match=r"1 of \d+ requested ids are not in"):
        split_features(entry, table, split, "cls")  # type: ignore[arg-type]
