"""Issue #12, the store's rows: damage a real entry written by ``extract`` and read it.

Every read for a probe, a report or a copy is checked (crc32c per unit, NaN/Inf); a missing or
truncated chunk is an error, never zeros; ``verify`` survives anything in one entry; no path
leaves an entry (object keys with ``..``, symlinks); a complete entry keeps no claims.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from embedkit.errors import IntegrityError
from embedkit.extract import ExtractionRequest, extract
from embedkit.store import (
    CacheRoot,
    FeatureEntry,
    copy_entry,
    open_local_copy,
    plan_gc,
    verify_root,
)
from embedkit.store.layout import COMPLETE_FILE, unit_record_name
from embedkit.store.lease import LEASES_DIR, Leases, Owner
from embedkit.store.root import check_object_path
from embedkit.study.demodata import demo_dataset_config

from .conftest import S3Server

UNIT = 8  # 24 demo images: units 0-2


def _extract(manifest: Path, model_cache: Path, cache: Path, **kw: Any) -> FeatureEntry:
    request = ExtractionRequest(
        model="test/tiny-dinov3-vit",
        dataset="demo",
        resolution=64,
        batch_size=4,
        num_workers=0,
        unit_rows=UNIT,
        device="cpu",
        **kw,
    )
    result = extract(request, manifest=manifest, cache=cache, model_cache_dir=model_cache)
    return FeatureEntry.open(CacheRoot.from_uri(str(cache)), result.entry.relpath)


@pytest.fixture(scope="module")
def pristine(
    demo_data: Path, model_cache: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, str]:
    """One real entry, extracted once; tests damage copies of its cache root."""
    folder = tmp_path_factory.mktemp("integrity")
    manifest = demo_data / f"{folder.name}.yaml"  # its paths are relative to the images
    doc = {"cache": str(folder / "cache"), "datasets": {"demo": demo_dataset_config()}}
    manifest.write_text(yaml.safe_dump(doc, sort_keys=False))
    entry = _extract(manifest, model_cache, folder / "cache")
    return folder / "cache", entry.relpath


@pytest.fixture
def entry(pristine: tuple[Path, str], tmp_path: Path) -> FeatureEntry:
    cache, relpath = pristine
    shutil.copytree(cache, tmp_path / "cache")
    return FeatureEntry.open(CacheRoot.from_uri(str(tmp_path / "cache")), relpath)


def _chunk(entry: FeatureEntry, name: str, u: int) -> Path:
    layout = entry.layout.chunk_layout(name)
    assert layout is not None
    (i,) = layout.chunks_in(*entry.unit_bounds(u))  # one chunk per unit at this size
    return layout.chunk_path(i)


def _fresh(entry: FeatureEntry) -> FeatureEntry:
    return FeatureEntry.open(entry.root, entry.relpath)


def _flip(path: Path, offset: int = 5) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x40
    path.write_bytes(bytes(data))


# ---- reads check what they read ------------------------------------------------------------


def test_an_undamaged_entry_reads_the_same_checked_or_not(entry: FeatureEntry) -> None:
    checked = entry.read("cls")
    np.testing.assert_array_equal(checked, _fresh(entry).read("cls", verify=False))
    ids = [entry.ids[i] for i in (17, 2, 9)]
    np.testing.assert_array_equal(_fresh(entry).read("cls", ids=ids), checked[[17, 2, 9]])
    assert _fresh(entry).valid_mask().all()


@pytest.mark.parametrize("how", ["whole", "ids", "rows", "derived", "out_dtype"])
def test_a_flipped_byte_is_an_error_naming_entry_array_unit_rows_and_repair(
    entry: FeatureEntry, how: str
) -> None:
    _flip(_chunk(entry, "cls", 1))
    fresh = _fresh(entry)
    read = {
        "whole": lambda: fresh.read("cls"),
        "ids": lambda: fresh.read("cls", ids=[fresh.ids[20], fresh.ids[9]]),
        "rows": lambda: fresh.read("cls", rows=slice(3, 11)),
        "derived": lambda: fresh.read("cls+mean"),
        "out_dtype": lambda: fresh.read("cls", out_dtype=np.float32),
    }[how]
    with pytest.raises(IntegrityError) as info:
        read()
    message = str(info.value)
    assert "cls, unit 1 (rows 8-16)" in message and "checksum mismatch" in message
    assert entry.key.short() in message and entry.uri in message
    assert f"embedkit cache repair {entry.key.short()}" in message
    # rows of the undamaged units still read; the opt-out reads the damaged unit unchecked
    np.testing.assert_array_equal(
        _fresh(entry).read("cls", rows=slice(0, 8)), entry.read("cls", rows=slice(0, 8))
    )
    assert _fresh(entry).read("cls", verify=False).shape == (24, entry.shapes["cls"][0])


def test_a_deleted_chunk_is_an_error_never_zeros(entry: FeatureEntry) -> None:
    _chunk(entry, "mean", 2).unlink()
    with pytest.raises(IntegrityError, match=r"mean, unit 2 \(rows 16-24\).*missing"):
        _fresh(entry).read("mean")
    with pytest.raises(IntegrityError, match="missing"):  # even unchecked: never zeros
        _fresh(entry).read("mean", verify=False)


def test_a_truncated_chunk_is_an_integrity_error(entry: FeatureEntry) -> None:
    path = _chunk(entry, "cls", 0)
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(IntegrityError, match=r"unit 0 \(rows 0-8\).*holds \d+ bytes"):
        _fresh(entry).read("cls", ids=[entry.ids[3]])


def test_nan_written_into_a_unit_is_an_error_even_with_a_matching_checksum(
    entry: FeatureEntry,
) -> None:
    path = _chunk(entry, "cls", 1)
    row_bytes = entry.shapes["cls"][0] * 2  # float16
    data = bytearray(path.read_bytes())
    data[3 * row_bytes : 3 * row_bytes + 2] = np.float16(np.nan).tobytes()
    path.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="checksum mismatch"):
        _fresh(entry).read("cls")
    # the record rewritten to match the NaN bytes: the NaN/Inf policy still refuses it
    from embedkit.store.checks import checksum

    record_path = Path(entry.root.local_path or "") / entry.layout.unit_path(1)
    record = json.loads(record_path.read_bytes())
    rows = np.frombuffer(bytes(data), dtype=np.float16).reshape(UNIT, -1)
    record["checksums"]["cls"] = checksum(rows, record["checksum_algorithm"])
    record_path.write_text(json.dumps(record))
    with pytest.raises(IntegrityError, match=f"NaN/Inf in the rows of {entry.ids[11]}"):
        _fresh(entry).read("cls")
    assert any("NaN/Inf" in p for p in _fresh(entry).verify())


def test_a_damaged_validity_mask_is_an_error(entry: FeatureEntry) -> None:
    _flip(_chunk(entry, "valid", 0), offset=2)
    with pytest.raises(IntegrityError, match=r"valid, unit 0 \(rows 0-8\)"):
        _fresh(entry).valid_mask()


def test_a_missing_unit_record_in_a_complete_entry_is_an_error(entry: FeatureEntry) -> None:
    (Path(entry.root.local_path or "") / entry.layout.unit_path(2)).unlink()
    with pytest.raises(IntegrityError, match="unit record is missing"):
        _fresh(entry).read("cls")


def test_a_copy_reads_checked_data_only(entry: FeatureEntry, tmp_path: Path) -> None:
    _flip(_chunk(entry, "cls", 0))
    dst = CacheRoot.from_uri(str(tmp_path / "dst"))
    with pytest.raises(IntegrityError, match="checksum mismatch"):
        copy_entry(entry.root, dst, entry.relpath)
    assert not dst.exists(f"{entry.relpath}/{COMPLETE_FILE}")


# ---- verify survives anything in one entry -------------------------------------------------


def _twin(entry: FeatureEntry) -> str:
    """A second, healthy entry in the same root (a copy of the first under another dataset)."""
    local = Path(entry.root.local_path or "")
    other = "other/" + entry.relpath.split("/", 1)[1]
    shutil.copytree(local / entry.relpath, local / other)
    return other


@pytest.mark.parametrize(
    "damage",
    ["bad group json", "bad array metadata", "missing array", "bad unit record", "deleted chunk"],
)
def test_verify_reports_a_damaged_entry_and_checks_the_others(
    entry: FeatureEntry, damage: str
) -> None:
    healthy = _twin(entry)
    local = Path(entry.root.local_path or "") / entry.relpath
    if damage == "bad group json":
        (local / "zarr.json").write_text('{"attributes": {"key": ')
    elif damage == "bad array metadata":
        (local / "cls" / "zarr.json").write_text("{not json")
    elif damage == "missing array":
        shutil.rmtree(local / "mean")
    elif damage == "bad unit record":
        (local / unit_record_name(1)).write_text("[1, 2")
    else:
        _chunk(entry, "cls", 2).unlink()
    results = verify_root(entry.root)
    assert results[healthy] == []
    assert results[entry.relpath], results
    if damage == "bad group json":
        assert "zarr.json is unreadable" in results[entry.relpath][0]


# ---- paths never leave an entry ------------------------------------------------------------


@pytest.mark.parametrize(
    "key",
    ["../x", "features/../../x", "/etc/passwd", "a\\..\\..\\x", "features//c", "./x", "C:x", ""],
)
def test_object_keys_must_stay_inside_the_entry(key: str) -> None:
    with pytest.raises(IntegrityError, match="Refusing the object key"):
        check_object_path("s3://b/e.zarr", key)
    assert check_object_path("s3://b/e.zarr", "cls/c/0/0") == "cls/c/0/0"


def test_push_refuses_a_symlink_planted_in_a_local_entry(
    entry: FeatureEntry, tmp_path: Path
) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("not part of any entry")
    local = Path(entry.root.local_path or "") / entry.relpath
    os.symlink(secret, local / "cls" / "notes.txt")
    dst = CacheRoot.from_uri(str(tmp_path / "dst"))
    with pytest.raises(IntegrityError, match="symbolic link"):
        copy_entry(entry.root, dst, entry.relpath)
    assert not any(p.name == "notes.txt" for p in (tmp_path / "dst").rglob("*"))
    with pytest.raises(IntegrityError, match="symbolic link"):
        plan_gc(entry.root, unused_since=None, partial_older_than=None)


def test_a_dotdot_key_in_a_shared_entry_never_escapes_the_local_root(
    entry: FeatureEntry, s3_server: S3Server, tmp_path: Path
) -> None:
    remote = CacheRoot.from_uri(s3_server.new_uri())
    copy_entry(entry.root, remote, entry.relpath)
    backend: Any = remote.backend
    evil = f"{backend.abspath(entry.relpath)}/features/../../../../../escaped.txt"
    backend.fs.pipe(evil, b"planted")
    assert any(".." in p for p in remote.files(entry.relpath)), "moto kept the key"
    local = CacheRoot.from_uri(str(tmp_path / "local" / "cache"))
    with pytest.raises(IntegrityError, match=r"Refusing the object key 'features/\.\./"):
        copy_entry(remote, local, entry.relpath)
    with pytest.raises(IntegrityError, match="Refusing the object key"):
        open_local_copy(FeatureEntry.open(remote, entry.relpath), tmp_path / "readcache")
    assert not list(tmp_path.rglob("escaped.txt"))


# ---- claims ----------------------------------------------------------------------------------


def test_a_job_that_finishes_after_finalize_leaves_no_claim(entry: FeatureEntry) -> None:
    leases = Leases(entry.root, entry.relpath, 60.0, Owner.this_process())
    with leases:
        assert leases.try_claim("layout", 7)  # created while the entry was being finalized
        shutil.rmtree(Path(entry.root.local_path or "") / entry.relpath / LEASES_DIR)
    # leaving the context marks held claims released: never written into a complete entry
    assert not entry.root.exists(f"{entry.relpath}/{LEASES_DIR}")
