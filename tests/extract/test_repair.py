"""``embedkit cache repair``: damaged units recomputed to the bytes of an undamaged entry."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest

from embedkit.errors import IncompleteEntryError, IntegrityError
from embedkit.extract import ExtractionRequest, extract
from embedkit.extract.repair import repair_entry, request_of
from embedkit.store import CacheRoot, FeatureEntry
from embedkit.store.layout import COMPLETE_FILE, LEASES_DIR

from ..conftest import write_manifest


def _request(**kw: object) -> ExtractionRequest:
    base: dict[str, object] = {
        "model": "test/tiny-dinov3-vit",
        "dataset": "demo",
        "resolution": 64,
        "batch_size": 3,  # batches of 3 inside units of 8: repair must keep these boundaries
        "num_workers": 0,
        "unit_rows": 8,
        "device": "cpu",
    }
    base.update(kw)
    return ExtractionRequest(**base)  # type: ignore[arg-type]


def _digests(entry_dir: Path) -> dict[str, str]:
    """sha256 of every data object of an entry (chunks, array metadata, ids)."""
    return {
        p.relative_to(entry_dir).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(entry_dir.rglob("*"))
        if p.is_file()
        and p.name != "last_used.json"
        and "units" not in p.parts
        and p.name != "COMPLETE.json"
    }


def _chunk(entry: FeatureEntry, name: str, u: int) -> Path:
    layout = entry.layout.chunk_layout(name)
    assert layout is not None
    (i,) = layout.chunks_in(*entry.unit_bounds(u))
    return layout.chunk_path(i)


@pytest.mark.parametrize("compression", ["none", "zstd"])
def test_repair_restores_flipped_truncated_and_deleted_chunks_bit_for_bit(
    demo_data: Path, model_cache: Path, tmp_path: Path, compression: str
) -> None:
    manifest = write_manifest(
        demo_data, cache=str(tmp_path / "cache"), name=f"{tmp_path.name}.yaml"
    )
    request = _request(compression=compression, patch_tokens=True)
    result = extract(request, manifest=manifest, model_cache_dir=model_cache)
    root = CacheRoot.from_uri(str(tmp_path / "cache"))
    entry = FeatureEntry.open(root, result.entry.relpath)
    entry_dir = tmp_path / "cache" / entry.relpath
    clean = tmp_path / "clean"
    shutil.copytree(entry_dir, clean)
    want = _digests(clean)
    assert request_of(entry).batch_size == 3

    flipped = _chunk(entry, "cls", 0)
    data = bytearray(flipped.read_bytes())
    data[len(data) // 2] ^= 0x01
    flipped.write_bytes(bytes(data))
    truncated = _chunk(entry, "patch", 2)
    truncated.write_bytes(truncated.read_bytes()[:-100])
    _chunk(entry, "valid", 2).unlink()
    assert len(FeatureEntry.open(root, entry.relpath).damaged_units()) == 2
    with pytest.raises(IntegrityError, match="embedkit cache repair"):
        FeatureEntry.open(root, entry.relpath).read("cls")

    repaired = repair_entry(
        entry.key.short(), manifest=manifest, device="cpu", model_cache_dir=model_cache
    )
    assert repaired.units == (0, 2)
    assert _digests(entry_dir) == want
    fresh = FeatureEntry.open(root, entry.relpath)
    assert fresh.verify() == []
    assert not (entry_dir / LEASES_DIR).exists()
    assert fresh.read("patch").shape[0] == 24
    # nothing left to do
    assert repair_entry(entry.relpath, manifest=manifest, model_cache_dir=model_cache).units == ()


def test_repair_refuses_an_incomplete_entry_and_changed_images(
    demo_data: Path, model_cache: Path, tmp_path: Path
) -> None:
    images = tmp_path / "images"
    shutil.copytree(demo_data, images)
    manifest = write_manifest(images, cache=str(tmp_path / "cache"), name="m.yaml")
    result = extract(_request(), manifest=manifest, model_cache_dir=model_cache)
    root = CacheRoot.from_uri(str(tmp_path / "cache"))
    entry = FeatureEntry.open(root, result.entry.relpath)
    _chunk(entry, "cls", 1).unlink()
    # an image file changed size since extraction: the content fingerprint no longer matches
    picture = next(p for p in sorted(images.rglob("*.png")))
    picture.write_bytes(picture.read_bytes() + b"\0")
    with pytest.raises(IntegrityError, match="another cache key"):
        repair_entry(entry.relpath, manifest=manifest, model_cache_dir=model_cache)
    (tmp_path / "cache" / entry.relpath / COMPLETE_FILE).unlink()
    with pytest.raises(IncompleteEntryError, match="rerun the same `embedkit extract`"):
        repair_entry(entry.relpath, manifest=manifest, model_cache_dir=model_cache)
