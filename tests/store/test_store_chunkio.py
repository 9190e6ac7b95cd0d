"""The direct chunk-file engine writes exactly what zarr-python writes, and reads what it reads."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zarr
from zarr.codecs import ZstdCodec

import embedkit.store.checks as checks
import embedkit.store.writer as writer_mod
from embedkit.errors import IntegrityError
from embedkit.store import CacheRoot, FeatureEntry
from embedkit.store.chunkio import ChunkDecodeError, ChunkLayout, zstd_content_size
from embedkit.store.layout import COMPLETE_FILE, EntryLayout

CASES = [
    # shape, chunk rows, dtype, zstd?
    ((23, 8), 5, "float16", True),
    ((23, 8), 5, "float16", False),
    ((10, 3, 2, 4), 4, "float32", True),
    ((10, 3, 2, 4), 4, "float32", False),
    ((23,), 5, "bool", False),
    ((7, 6), 7, "float64", True),  # a single full chunk
]


def _make(store_dir: Path, shape: tuple[int, ...], rows: int, dtype: str, zstd: bool) -> zarr.Array:
    return zarr.create_array(
        str(store_dir),
        name="a",
        shape=shape,
        dtype=dtype,
        chunks=(rows, *shape[1:]),
        compressors=[ZstdCodec(level=1)] if zstd else None,
        filters=None,
        fill_value=0,
        config={"write_empty_chunks": True},
    )


def _data(shape: tuple[int, ...], dtype: str, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if dtype == "bool":
        return rng.random(shape) < 0.7
    return rng.standard_normal(shape).astype(dtype)


def _chunk_files(array_dir: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(array_dir)): p.read_bytes()
        for p in sorted(array_dir.rglob("*"))
        if p.is_file() and p.name != "zarr.json"
    }


def _write_fast(layout: ChunkLayout, data: np.ndarray, *, durable: bool = True) -> None:
    for i in range(layout.n_chunks):
        s, e = layout.chunk_bounds(i)
        layout.write_chunk(i, np.ascontiguousarray(data[s:e]), durable=durable)


@pytest.mark.parametrize(("shape", "rows", "dtype", "zstd"), CASES)
def test_chunk_files_match_zarr_byte_for_byte(
    tmp_path: Path, shape: tuple[int, ...], rows: int, dtype: str, zstd: bool
) -> None:
    data = _data(shape, dtype)
    ref = _make(tmp_path / "zarr", shape, rows, dtype, zstd)
    ref[...] = data
    fast_arr = _make(tmp_path / "fast", shape, rows, dtype, zstd)
    layout = ChunkLayout.of(fast_arr, tmp_path / "fast" / "a")
    assert layout is not None and (layout.zstd is not None) == zstd
    _write_fast(layout, data)
    want = _chunk_files(tmp_path / "zarr" / "a")
    assert len(want) == layout.n_chunks
    assert _chunk_files(tmp_path / "fast" / "a") == want
    # and plain zarr-python reads the fast files back identically
    np.testing.assert_array_equal(zarr.open_array(str(tmp_path / "fast"), path="a")[...], data)


@pytest.mark.parametrize(("shape", "rows", "dtype", "zstd"), CASES)
def test_fast_reads_what_zarr_wrote(
    tmp_path: Path, shape: tuple[int, ...], rows: int, dtype: str, zstd: bool
) -> None:
    data = _data(shape, dtype, seed=1)
    arr = _make(tmp_path, shape, rows, dtype, zstd)
    arr[...] = data
    layout = ChunkLayout.of(arr, tmp_path / "a")
    assert layout is not None
    n = shape[0]
    for start, stop in [(0, n), (1, n - 1), (rows - 1, min(n, rows + 1)), (n - 1, n), (3, 3)]:
        out = np.empty((stop - start, *shape[1:]), dtype=dtype)
        layout.read_rows(start, stop, out)
        np.testing.assert_array_equal(out, data[start:stop])
    if dtype != "bool":  # a strided, wider-dtype destination (derived poolings, out_dtype)
        wide = np.zeros((n, *shape[1:-1], shape[-1] + 3), dtype=np.float64)
        layout.read_rows(0, n, wide[..., 1 : 1 + shape[-1]])
        np.testing.assert_array_equal(wide[..., 1 : 1 + shape[-1]], data.astype(np.float64))
        assert not wide[..., 0].any() and not wide[..., -2:].any()


def test_missing_chunks_raise_never_read_as_fill_value(tmp_path: Path) -> None:
    arr = _make(tmp_path, (23, 8), 5, "float16", True)
    layout = ChunkLayout.of(arr, tmp_path / "a")
    assert layout is not None
    data = _data((23, 8), "float16")
    layout.write_chunk(1, data[5:10], durable=False)
    out = np.full((23, 8), 7, dtype=np.float16)
    layout.read_rows(5, 10, out[5:10])
    np.testing.assert_array_equal(out[5:10], data[5:10])
    with pytest.raises(ChunkDecodeError, match=r"c/0/0 is missing"):
        layout.read_rows(0, 23, out)


@pytest.mark.parametrize("zstd", [True, False])
def test_damaged_chunks_raise(tmp_path: Path, zstd: bool) -> None:
    arr = _make(tmp_path, (23, 8), 5, "float16", zstd)
    layout = ChunkLayout.of(arr, tmp_path / "a")
    assert layout is not None
    _write_fast(layout, _data((23, 8), "float16"))
    path = layout.chunk_path(2)
    path.write_bytes(path.read_bytes()[:-3])
    out = np.empty((23, 8), dtype=np.float16)
    with pytest.raises(ChunkDecodeError, match=str(path)):
        layout.read_rows(0, 23, out)
    if zstd:  # a valid frame of the wrong size
        path.write_bytes(layout.zstd.encode(np.zeros(3, np.uint8)))  # type: ignore[union-attr]
        with pytest.raises(ChunkDecodeError, match="header declares 3"):
            layout.read_rows(0, 23, out)


def test_unsupported_layouts_fall_back(tmp_path: Path) -> None:
    sharded = zarr.create_array(
        str(tmp_path), name="s", shape=(8, 4), dtype="float16", chunks=(2, 4), shards=(4, 4)
    )
    assert ChunkLayout.of(sharded, tmp_path / "s") is None
    split = zarr.create_array(str(tmp_path), name="t", shape=(8, 4), dtype="float16", chunks=(2, 2))
    assert ChunkLayout.of(split, tmp_path / "t") is None
    big = zarr.create_array(
        str(tmp_path),
        name="b",
        shape=(8, 4),
        dtype=">f4",
        chunks=(2, 4),
        serializer=zarr.codecs.BytesCodec(endian="big"),
        compressors=None,
    )
    assert ChunkLayout.of(big, tmp_path / "b") is None


def test_zstd_content_size() -> None:
    from numcodecs.zstd import Zstd

    for n in (0, 1, 255, 256, 65_791, 1 << 20):
        assert zstd_content_size(Zstd(level=1).encode(np.zeros(n, np.uint8))) == n
    assert zstd_content_size(b"not zstd at all") is None


# ---- through FeatureEntry -----------------------------------------------------------------

DIMS = {"cls": (8,), "mean": (8,)}
N, UNIT = 23, 5


def _entry(root: CacheRoot, kit: Any, compression: str) -> tuple[FeatureEntry, dict[str, Any]]:
    ids = kit.make_ids(N)
    key = kit.make_key(ids, poolings=tuple(DIMS))
    entry = FeatureEntry.create_or_open(
        root, key, ids=ids, shapes=DIMS, unit_rows=UNIT, provenance={}, compression=compression
    )
    feats = kit.make_features(N, DIMS)
    return entry, feats


def _write_units(entry: FeatureEntry, feats: dict[str, np.ndarray]) -> np.ndarray:
    valid = np.ones(N, bool)
    valid[[3, 17]] = False
    for u in range(entry.n_units):
        s, e = entry.unit_bounds(u)
        skipped = [(entry.ids[i], "unreadable") for i in range(s, e) if not valid[i]]
        entry.write_unit(
            u, {p: a[s:e] for p, a in feats.items()}, valid=valid[s:e], skipped=skipped
        )
    return valid


@pytest.mark.parametrize("compression", ["zstd", "none"])
@pytest.mark.parametrize("fsync", [True, False])
def test_entry_fast_path_is_plain_zarr(
    tmp_path: Path, kit: Any, compression: str, fsync: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(writer_mod, "FSYNC", fsync)
    root = CacheRoot.from_uri(tmp_path / "cache")
    entry, feats = _entry(root, kit, compression)
    assert (
        entry.layout.chunk_layout("cls") is not None
        and entry.layout.chunk_layout("valid") is not None
    )
    valid = _write_units(entry, feats)
    entry.finalize()
    want = {p: np.where(valid[:, None], a, 0).astype(np.float16) for p, a in feats.items()}
    store = root.zarr_store(entry.relpath, read_only=True)
    for p in DIMS:
        np.testing.assert_array_equal(zarr.open_array(store, path=p)[...], want[p])
    np.testing.assert_array_equal(zarr.open_array(store, path="valid")[...], valid)
    reader = FeatureEntry.open(root, entry.key)
    np.testing.assert_array_equal(reader.read("cls"), want["cls"])
    np.testing.assert_array_equal(reader.read("mean", rows=slice(4, 21)), want["mean"][4:21])
    both = reader.read("cls+mean", out_dtype=np.float32)
    np.testing.assert_array_equal(both, np.concatenate([want["cls"], want["mean"]], 1))
    record = reader.unit_record(2)
    assert record["checksum_algorithm"] == "crc32c" and len(record["checksums"]) == 3
    assert reader.verify() == []


def test_fast_path_reads_zarr_written_entry(
    tmp_path: Path, kit: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Units written by zarr-python (the fsspec code path) read back through the fast path."""
    root = CacheRoot.from_uri(tmp_path / "cache")
    entry, feats = _entry(root, kit, "zstd")
    monkeypatch.setattr(EntryLayout, "chunk_layout", lambda self, name: None)
    valid = _write_units(entry, feats)
    monkeypatch.undo()
    reader = FeatureEntry.open(root, entry.key, allow_partial=True)
    assert reader.layout.chunk_layout("cls") is not None
    want = np.where(valid[:, None], feats["cls"], 0).astype(np.float16)
    np.testing.assert_array_equal(reader.read("cls"), want)
    assert reader.verify() == [f"no {COMPLETE_FILE}: entry incomplete (5 of 5 units written)"]


def test_sha256_records_still_verify(tmp_path: Path, kit: Any) -> None:
    root = CacheRoot.from_uri(tmp_path / "cache")
    entry, feats = _entry(root, kit, "none")
    _write_units(entry, feats)
    entry.finalize()
    # rewrite unit 1's record as an older version wrote it: sha256, no algorithm field
    path = root.local_path / entry.layout.unit_path(1)  # type: ignore[operator]
    record = json.loads(path.read_bytes())
    del record["checksum_algorithm"]
    s, e = entry.unit_bounds(1)
    for name in record["checksums"]:
        data = np.ascontiguousarray(entry.layout.array(name)[s:e])
        record["checksums"][name] = hashlib.sha256(data.view(np.uint8).data).hexdigest()
    path.write_text(json.dumps(record))
    assert entry.verify() == []
    record["checksums"]["cls"] = "0" * 64
    path.write_text(json.dumps(record))
    assert entry.verify() == ["unit 1 (rows 5-10): checksum mismatch in cls"]


def test_damaged_zstd_chunk_read_raises_integrity_error(tmp_path: Path, kit: Any) -> None:
    root = CacheRoot.from_uri(tmp_path / "cache")
    entry, feats = _entry(root, kit, "zstd")
    _write_units(entry, feats)
    entry.finalize()
    layout = entry.layout.chunk_layout("cls")
    assert layout is not None
    chunk = layout.chunk_path(2)
    chunk.write_bytes(chunk.read_bytes()[:-5])
    with pytest.raises(IntegrityError, match="cannot be decoded"):
        FeatureEntry.open(root, entry.key).read("cls")


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_nonfinite_check(dtype: Any) -> None:
    finfo = np.finfo(dtype)
    ok = np.array([0, -0.0, finfo.max, -finfo.max, finfo.tiny, -finfo.smallest_subnormal], dtype)
    assert not checks.any_nonfinite(ok)
    for bad in (np.inf, -np.inf, np.nan, -np.nan):
        a = ok.copy()
        a[2] = bad
        assert checks.any_nonfinite(a), bad
    neg_nan = np.array([0], dtype)
    neg_nan.view(f"u{neg_nan.itemsize}")[0] = np.iinfo(f"u{neg_nan.itemsize}").max
    assert np.isnan(neg_nan[0]) and checks.any_nonfinite(neg_nan)
