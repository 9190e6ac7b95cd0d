"""Compute each image once: rows copied from complete entries of the same feature space."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

import embedkit.extract.runner as runner
from embedkit.data.demo import DemoSpec, generate_demo
from embedkit.extract import ExtractionRequest, extract
from embedkit.extract.fingerprint import MISSING, image_fingerprint
from embedkit.store import CacheRoot, FeatureEntry, list_entries
from embedkit.store.reuse import RECORD_COPIED, RECORD_FINGERPRINTS
from embedkit.study.demodata import demo_dataset_config

POOLINGS = ("cls", "mean")


def _request(**kw: Any) -> ExtractionRequest:
    base: dict[str, Any] = {
        "model": "test/tiny-dinov3-vit",
        "dataset": "demo",
        "resolution": 224,
        "batch_size": 4,
        "num_workers": 0,
        "unit_rows": 8,
        "device": "cpu",
    }
    base.update(kw)
    return ExtractionRequest(**base)


def _manifest(folder: Path, cache: Path, name: str, **dataset: Any) -> Path:
    path = folder / f"{name}.yaml"
    doc = {"cache": str(cache), "datasets": {"demo": {**demo_dataset_config(), **dataset}}}
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def _data(folder: Path, patients: int) -> Path:
    generate_demo(folder, DemoSpec(n_patients=patients, images_per_patient=3, size=128))
    return folder


def _features(entry: FeatureEntry) -> dict[str, np.ndarray]:
    return {p: entry.read(p) for p in POOLINGS}


def _assert_same(a: FeatureEntry, b: FeatureEntry) -> None:
    assert a.ids == b.ids
    for p in POOLINGS:
        np.testing.assert_array_equal(a.read(p), b.read(p))
    np.testing.assert_array_equal(a.valid_mask(), b.valid_mask())


@pytest.fixture
def grown(tmp_path: Path, model_cache: Path) -> dict[str, Any]:
    """A cache holding the entry of 8 patients (24 images); the data then grown to 10 (30)."""
    data = _data(tmp_path / "data", 8)
    cache = tmp_path / "cache"
    man = _manifest(data, cache, "m")
    first = extract(_request(), manifest=man, model_cache_dir=model_cache)
    _data(data, 10)
    return {"data": data, "cache": cache, "manifest": man, "first": first.entry}


def test_superset_computes_only_new_images_and_equals_a_fresh_extraction(
    grown: dict[str, Any], tmp_path: Path, model_cache: Path
) -> None:
    result = extract(_request(), manifest=grown["manifest"], model_cache_dir=model_cache)
    assert (result.images_computed, result.images_copied) == (6, 24)
    assert result.copied_from == (grown["first"].relpath,)
    entry = result.entry
    assert entry.is_complete and entry.n_images == 30
    assert entry.key.feature_space() == grown["first"].key.feature_space()
    assert entry.key.digest() != grown["first"].key.digest()
    # Provenance: the entry names its source, and each unit record its copied rows.
    reuse = entry.attrs["provenance"]["reuse"]
    assert reuse["rows_copied"] == 24 and reuse["rows_computed"] == 6
    assert reuse["sources"] == [
        {"relpath": grown["first"].relpath, "digest": grown["first"].key.digest(), "rows": 24}
    ]
    copied = [entry.unit_record(u).get(RECORD_COPIED, {}) for u in range(entry.n_units)]
    runs = [run for rec in copied for run in rec.get(grown["first"].key.digest(), [])]
    assert sum(n for _, _, n in runs) == 24
    for dst, src, n in runs:
        assert entry.ids[dst : dst + n] == grown["first"].ids[src : src + n]
    fps = [fp for u in range(entry.n_units) for fp in entry.unit_record(u)[RECORD_FINGERPRINTS]]
    assert fps == [image_fingerprint(p) for p in _table_paths(grown["manifest"])]

    fresh_man = _manifest(grown["data"], tmp_path / "fresh", "fresh")
    fresh = extract(_request(reuse=False), manifest=fresh_man, model_cache_dir=model_cache)
    assert (fresh.images_computed, fresh.images_copied) == (30, 0)
    assert fresh.entry.key == entry.key
    _assert_same(entry, fresh.entry)  # bit for bit: batch composition does not matter here


def _table_paths(manifest: Path) -> list[Path]:
    from embedkit.manifest import load_manifest

    return list(load_manifest(manifest).dataset("demo").load().paths)


def test_a_filtered_subset_computes_nothing_and_loads_no_encoder(
    grown: dict[str, Any], tmp_path: Path, model_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    full = extract(_request(), manifest=grown["manifest"], model_cache_dir=model_cache).entry

    def no_encoder(*_a: object, **_k: object) -> None:
        raise AssertionError("the encoder was loaded for a subset")

    monkeypatch.setattr(runner, "load_planned_encoder", no_encoder)
    pa = _manifest(grown["data"], grown["cache"], "pa", filters={"view": ["PA"]})
    result = extract(_request(), manifest=pa, model_cache_dir=model_cache)
    assert result.images_computed == 0 and result.images_copied == result.entry.n_images == 20
    assert result.copied_from == (full.relpath,)  # the largest source first
    for p in POOLINGS:
        np.testing.assert_array_equal(result.entry.read(p), full.read(p, ids=result.entry.ids))


def test_a_changed_image_file_is_computed_again(grown: dict[str, Any], model_cache: Path) -> None:
    images = grown["data"] / "images"
    changed = sorted(images.glob("*/*.png"))[4]
    before = image_fingerprint(changed)
    content_before = image_fingerprint(changed, "content")
    raw = bytearray(changed.read_bytes())
    from PIL import Image

    with Image.open(changed) as im:
        pixels = np.array(im)
    pixels[10:20, 10:20] = 0
    Image.fromarray(pixels).save(changed)
    assert image_fingerprint(changed) != before
    assert image_fingerprint(changed, "content") != content_before
    assert bytes(raw) != changed.read_bytes()
    result = extract(_request(), manifest=grown["manifest"], model_cache_dir=model_cache)
    assert (result.images_computed, result.images_copied) == (7, 23)
    entry = result.entry
    row = entry.row_of(changed.stem)
    copied_rows = {
        dst + i
        for u in range(entry.n_units)
        for runs in entry.unit_record(u).get(RECORD_COPIED, {}).values()
        for dst, _, n in runs
        for i in range(n)
    }
    assert row not in copied_rows


def test_fingerprints_cover_bytes_not_paths(tmp_path: Path) -> None:
    a, b = tmp_path / "a.bin", tmp_path / "b.bin"
    payload = bytes(range(256)) * 1024  # 256 KiB: the quick mode samples both ends
    a.write_bytes(payload)
    b.write_bytes(payload)
    st = a.stat()
    import os

    os.utime(b, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert image_fingerprint(a) == image_fingerprint(b)  # the path is not covered
    assert image_fingerprint(a, "content") == image_fingerprint(b, "content")
    assert image_fingerprint(a).startswith("quick:")
    assert image_fingerprint(a) != image_fingerprint(a, "content")  # modes never match
    # A same-size edit in the middle with the mtime put back: only "content" sees it.
    edited = bytearray(payload)
    edited[len(payload) // 2] ^= 0xFF
    b.write_bytes(bytes(edited))
    os.utime(b, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert image_fingerprint(a, "content") != image_fingerprint(b, "content")
    # The same edit made the ordinary way (mtime updated): both see it.
    os.utime(b, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    assert image_fingerprint(a) != image_fingerprint(b)
    assert image_fingerprint(tmp_path / "gone.png") == MISSING


def test_content_mode_is_a_separate_feature_of_the_key(
    grown: dict[str, Any], model_cache: Path
) -> None:
    """Entries fingerprinted by content reuse rows only from entries fingerprinted by content."""
    result = extract(
        _request(fingerprint="content"), manifest=grown["manifest"], model_cache_dir=model_cache
    )
    assert (result.images_computed, result.images_copied) == (30, 0)
    assert result.entry.attrs["provenance"]["fingerprint"] == "content"
    again = extract(
        _request(fingerprint="content", unit_rows=4),
        manifest=_manifest(grown["data"], grown["cache"], "pa", filters={"view": ["PA"]}),
        model_cache_dir=model_cache,
    )
    assert (again.images_computed, again.images_copied) == (0, 20)


class _Stop(Exception):
    pass


@pytest.mark.parametrize("stop_after", [1, 4, 5])
def test_interrupted_reuse_resumes_to_the_same_bytes(
    grown: dict[str, Any],
    tmp_path: Path,
    model_cache: Path,
    monkeypatch: pytest.MonkeyPatch,
    stop_after: int,
) -> None:
    """Stopped after 1 or 4 copied units, or after the mixed unit, and rerun, the entry equals
    an uninterrupted fresh extraction byte for byte; units written before the stop are kept."""
    # Units of 5 rows over 24 old + 6 new images: 4 copied, 1 mixed (4 + 1), 1 computed.
    req = _request(unit_rows=5, batch_size=3)
    ref_man = _manifest(grown["data"], tmp_path / "ref-cache", "ref")
    reference = extract(
        _request(unit_rows=5, batch_size=3, reuse=False), manifest=ref_man,
        model_cache_dir=model_cache,
    ).entry  # fmt: skip

    real_submit = runner._UnitWriter.submit
    submitted: list[int] = []

    def submit(self: Any, u: int, *args: Any, **kw: Any) -> None:
        if len(submitted) == stop_after:
            raise _Stop
        submitted.append(u)
        real_submit(self, u, *args, **kw)

    monkeypatch.setattr(runner._UnitWriter, "submit", submit)
    with pytest.raises(_Stop):
        extract(req, manifest=grown["manifest"], model_cache_dir=model_cache)
    monkeypatch.undo()
    root = CacheRoot.from_uri(str(grown["cache"]))
    (partial,) = [s for s in list_entries(root) if not s.complete]
    assert partial.units_done == stop_after
    resumed = extract(req, manifest=grown["manifest"], model_cache_dir=model_cache)
    assert resumed.entry.relpath == partial.relpath
    assert resumed.images_copied + resumed.images_computed == 30 - 5 * stop_after
    assert resumed.images_computed == (6 if stop_after < 5 else 5)
    _assert_same(resumed.entry, reference)
    assert resumed.entry.attrs["provenance"]["reuse"]["rows_copied"] == 24
    mixed = resumed.entry.unit_record(4)
    assert sum(n for runs in mixed[RECORD_COPIED].values() for _, _, n in runs) == 4


def test_growing_the_demo_data_keeps_its_files_and_computes_only_new_images(
    tmp_path: Path, model_cache: Path
) -> None:
    from embedkit.manifest import load_manifest
    from embedkit.study.demodata import ensure_demo_data

    folder = tmp_path / "demo"
    man = _manifest(tmp_path, tmp_path / "cache", "m", images=str(folder / "images"),
                    index=str(folder / "index.csv"))  # fmt: skip
    config = load_manifest(man).dataset("demo")
    assert ensure_demo_data(config, DemoSpec(n_patients=4, images_per_patient=3, size=96))
    first = extract(_request(), manifest=man, model_cache_dir=model_cache)
    assert first.images_computed == 12
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in folder.glob("images/*/*.png")}
    assert ensure_demo_data(config, DemoSpec(n_patients=6, images_per_patient=3, size=96))
    after = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in folder.glob("images/*/*.png")}
    assert len(after) == 36 and all(after[p] == v for p, v in before.items())  # + label maps
    # Grown data equals data drawn for 6 patients at once (each patient seeds its own images).
    fresh = tmp_path / "fresh"
    generate_demo(fresh, DemoSpec(n_patients=6, images_per_patient=3, size=96))
    for path, (_, data) in after.items():
        assert (fresh / path.relative_to(folder)).read_bytes() == data
    assert (fresh / "index.csv").read_text() == (folder / "index.csv").read_text()
    grown = extract(_request(), manifest=man, model_cache_dir=model_cache)
    assert (grown.images_computed, grown.images_copied) == (6, 12)
    assert len(load_manifest(man).dataset("demo").load().ids) == 18
