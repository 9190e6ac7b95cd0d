"""Storage codecs: the default, compressed units split into parallel chunks, durable writes.

Compressed units hold several chunks; the files must stay plain Zarr v3 (what zarr-python
writes and reads), verify must still find damage in any chunk of a unit, and the parallel,
writeback-kicking write path must produce the same bytes as a serial plain one.
"""

from __future__ import annotations

import errno
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zarr
from zarr.codecs import ZstdCodec

import embedkit.store.chunkio as chunkio
import embedkit.store.writer as writer_mod
from embedkit.errors import CacheWriteError, IncompleteEntryError, IntegrityError
from embedkit.store import CacheRoot, FeatureEntry
from embedkit.store.layout import unit_record_name

DIMS = {"cls": (8,), "mean": (8,)}
N, UNIT = 23, 6  # 4 units, the last one short
ROW_BYTES = 8 * 2  # float16


@pytest.fixture
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """zstd chunks of 2 rows (32 bytes), 3 per 6-row unit; uncompressed ones of 3 rows, 2."""
    monkeypatch.setattr(writer_mod, "CHUNK_BYTES", {"none": 4 * ROW_BYTES, "zstd": 2 * ROW_BYTES})


def _new(root: CacheRoot, kit: Any, compression: str | None = None) -> FeatureEntry:
    ids = kit.make_ids(N)
    return FeatureEntry.create_or_open(
        root,
        kit.make_key(ids, poolings=tuple(DIMS)),
        ids=ids,
        shapes=DIMS,
        unit_rows=UNIT,
        provenance={},
        compression="none" if compression is None else compression,
    )


def _write(entry: FeatureEntry, feats: dict[str, np.ndarray], units: list[int]) -> None:
    for u in units:
        s, e = entry.unit_bounds(u)
        entry.write_unit(u, {p: a[s:e] for p, a in feats.items()}, valid=np.ones(e - s, bool))


def test_chunk_rows() -> None:
    target = writer_mod.CHUNK_BYTES["zstd"]
    assert writer_mod.chunk_rows(16384, 2048, "none") * 2048 == 16 << 20  # 2 chunks of 16 MiB
    assert writer_mod.chunk_rows(1024, 2048, "none") == 1024  # 2 MB unit: one chunk
    assert writer_mod.chunk_rows(4096, 2048, "none") == 4096  # 8 MB: one chunk
    assert writer_mod.chunk_rows(16384, 2048, "zstd") * 2048 == target  # 8 chunks of 4 MiB
    assert writer_mod.chunk_rows(1024, 1536, "zstd") == 1024  # 1.5 MB unit: one chunk
    assert writer_mod.chunk_rows(1000, 16384, "zstd") == 250  # 16 MB: 4 chunks of 4 MB
    assert writer_mod.chunk_rows(1009, 16384, "zstd") == 1009  # prime: no split
    rows = writer_mod.chunk_rows(1024, 301_056, "zstd")  # patch tokens, 14x14x768 float16
    assert 1024 % rows == 0 and target / 4 <= rows * 301_056 <= target


def test_default_is_uncompressed(tmp_path: Path, kit: Any) -> None:
    root = CacheRoot.from_uri(tmp_path / "c")
    entry = _new(root, kit)
    assert writer_mod.COMPRESSIONS[0] == "none"
    assert entry.info()["compression"] == {"name": "none"}
    arr = zarr.open_array(root.zarr_store(entry.relpath, read_only=True), path="cls")
    assert arr.compressors == () and arr.chunks == (UNIT, 8)
    with pytest.raises(ValueError, match="Expected compression in"):
        _new(CacheRoot.from_uri(tmp_path / "d"), kit, compression="lz4")


@pytest.mark.usefixtures("small_chunks")
def test_multichunk_zstd_units_round_trip(root: CacheRoot, kit: Any) -> None:
    entry = _new(root, kit, "zstd")
    store = root.zarr_store(entry.relpath, read_only=True)
    arr = zarr.open_array(store, path="cls")
    assert arr.chunks == (2, 8) and isinstance(arr.compressors[0], ZstdCodec)
    feats = kit.make_features(N, DIMS)
    _write(entry, feats, [2, 0, 3, 1])
    entry.finalize()
    want = {p: a.astype(np.float16) for p, a in feats.items()}
    reader = FeatureEntry.open(root, entry.key)
    np.testing.assert_array_equal(reader.read("cls"), want["cls"])
    np.testing.assert_array_equal(reader.read("mean", rows=slice(5, 19)), want["mean"][5:19])
    ids = [reader.ids[i] for i in (22, 0, 7)]
    np.testing.assert_array_equal(reader.read("cls", ids=ids), want["cls"][[22, 0, 7]])
    for p in DIMS:  # plain zarr-python reads what the store wrote
        np.testing.assert_array_equal(zarr.open_array(store, path=p)[...], want[p])
    assert reader.verify() == []
    # reopening with the default compression keeps the entry's own codec and chunks
    again = _new(root, kit)
    assert again.info()["compression"] == {"name": "zstd", "level": writer_mod.ZSTD_LEVEL}


@pytest.mark.usefixtures("small_chunks")
def test_multichunk_files_match_zarr_python(tmp_path: Path, kit: Any) -> None:
    root = CacheRoot.from_uri(tmp_path / "c")
    entry = _new(root, kit, "zstd")
    feats = kit.make_features(N, DIMS)
    _write(entry, feats, list(range(entry.n_units)))
    ref = zarr.create_array(
        str(tmp_path / "ref"),
        name="cls",
        shape=(N, 8),
        dtype="float16",
        chunks=(2, 8),
        chunk_key_encoding={"name": "default", "separator": "."},
        compressors=[ZstdCodec(level=writer_mod.ZSTD_LEVEL)],
        filters=None,
        fill_value=0,
        config={"write_empty_chunks": True},
    )
    ref[...] = feats["cls"].astype(np.float16)
    want = kit.stored_files(tmp_path / "ref" / "cls")
    assert len(want) == 12
    assert kit.stored_files(tmp_path / "c" / entry.relpath / "cls") == want


@pytest.mark.usefixtures("small_chunks")
def test_resumed_multichunk_entry_is_identical(tmp_path: Path, kit: Any) -> None:
    feats = kit.make_features(N, DIMS)
    whole = CacheRoot.from_uri(tmp_path / "whole")
    e1 = _new(whole, kit, "zstd")
    _write(e1, feats, list(range(e1.n_units)))
    e1.finalize()
    resumed = CacheRoot.from_uri(tmp_path / "resumed")
    e2 = _new(resumed, kit, "zstd")
    _write(e2, feats, [1])
    del e2  # "killed"; the rerun passes no compression and must keep zstd
    e2 = _new(resumed, kit)
    assert e2.pending_units() == [0, 2, 3]
    _write(e2, feats, e2.pending_units())
    e2.finalize()
    a = kit.feature_files(tmp_path / "whole" / e1.relpath)
    b = kit.feature_files(tmp_path / "resumed" / e2.relpath)
    assert a == b and len(a) == 24


@pytest.mark.usefixtures("small_chunks")
def test_verify_finds_damage_in_any_chunk_of_a_unit(tmp_path: Path, kit: Any) -> None:
    root = CacheRoot.from_uri(tmp_path / "c")
    entry = _new(root, kit, "zstd")
    _write(entry, kit.make_features(N, DIMS), list(range(entry.n_units)))
    entry.finalize()
    cdir = tmp_path / "c" / entry.relpath / "cls"
    middle = cdir / "c.4.0"  # unit 1 = chunks 3, 4, 5
    good = middle.read_bytes()
    middle.write_bytes((cdir / "c.9.0").read_bytes())  # a valid chunk, wrong content
    assert entry.verify() == ["unit 1 (rows 6-12): checksum mismatch in cls"]
    middle.write_bytes(good[:-4])  # truncated
    problems = entry.verify()
    assert len(problems) == 1 and problems[0].startswith(
        "unit 1 (rows 6-12): cls cannot be decoded"
    )
    with pytest.raises(IntegrityError, match="cannot be decoded"):
        FeatureEntry.open(root, entry.key).read("cls")
    middle.write_bytes(good)
    assert entry.verify() == []


@pytest.mark.usefixtures("small_chunks")
@pytest.mark.parametrize("compression", ["zstd", "none"])
def test_parallel_durable_writes_equal_serial_plain_ones(
    tmp_path: Path, kit: Any, compression: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    feats = kit.make_features(N, DIMS)
    trees = []
    for name, workers, fsync in (("serial", 1, False), ("parallel", 2, True)):
        with ThreadPoolExecutor(max_workers=workers) as pool, monkeypatch.context() as mp:
            mp.setattr(writer_mod, "POOL", pool)
            mp.setattr(chunkio, "POOL", pool)
            mp.setattr(writer_mod, "FSYNC", fsync)
            mp.setattr(chunkio, "WRITEBACK_PIECE", 40)  # several kicked pieces per chunk
            root = CacheRoot.from_uri(tmp_path / name)
            entry = _new(root, kit, compression)
            _write(entry, feats, list(range(entry.n_units)))
            entry.finalize()
            trees.append(kit.feature_files(tmp_path / name / entry.relpath))
            np.testing.assert_array_equal(
                FeatureEntry.open(root, entry.key).read("cls"), feats["cls"].astype(np.float16)
            )
    assert trees[0] == trees[1] and trees[0]


def test_durable_write_kicks_writeback_piece_by_piece(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[int, int]] = []
    monkeypatch.setattr(chunkio, "_start_writeback", lambda fd, off, n: calls.append((off, n)))
    monkeypatch.setattr(chunkio, "WRITEBACK_PIECE", 1000)
    data = np.random.default_rng(0).standard_normal((100, 8)).astype(np.float16)  # 1600 B
    path = tmp_path / "f"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        chunkio._write_all(fd, data.reshape(-1).view(np.uint8).data, kick=True)
    finally:
        os.close(fd)
    assert path.read_bytes() == data.tobytes()
    assert calls == [(0, 1000), (1000, 600)]
    calls.clear()
    arr = zarr.create_array(
        str(tmp_path / "z"),
        name="a",
        shape=(100, 8),
        dtype="float16",
        chunks=(100, 8),
        compressors=None,
    )
    layout = chunkio.ChunkLayout.of(arr, tmp_path / "z" / "a")
    assert layout is not None
    layout.write_chunk(0, data, durable=False)
    assert calls == []  # page-cache writes are not pushed to disk early
    layout.write_chunk(0, data, durable=True)
    assert calls == [(0, 1000), (1000, 600)]
    np.testing.assert_array_equal(zarr.open_array(str(tmp_path / "z"), path="a")[...], data)


@pytest.mark.skipif(chunkio._start_writeback is None, reason="no sync_file_range here")
def test_sync_file_range_is_callable(tmp_path: Path) -> None:
    fd = os.open(tmp_path / "g", os.O_WRONLY | os.O_CREAT)
    try:
        os.write(fd, b"x" * 4096)
        assert chunkio._start_writeback(fd, 0, 4096) == 0  # type: ignore[misc]
    finally:
        os.close(fd)


@pytest.mark.parametrize("compression", ["zstd", "none"])
def test_entries_with_nested_chunk_keys_still_work(
    tmp_path: Path, kit: Any, compression: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Entries made before flat chunk keys (``c/<i>/0``) resume, read and verify as before."""
    root = CacheRoot.from_uri(tmp_path / "c")
    feats = kit.make_features(N, DIMS)
    with monkeypatch.context() as mp:
        mp.setattr(writer_mod, "CHUNK_KEYS", {"name": "default", "separator": "/"})
        old = _new(root, kit, compression)
        _write(old, feats, [0, 2])
    entry = _new(root, kit)  # resumed by the current code
    _write(entry, feats, entry.pending_units())
    entry.finalize()
    cdir = tmp_path / "c" / entry.relpath / "cls"
    assert sorted(p.name for p in cdir.iterdir()) == ["c", "zarr.json"]
    assert (cdir / "c" / "3" / "0").is_file()
    reader = FeatureEntry.open(root, entry.key)
    assert reader.layout.chunk_layout("cls") is not None
    np.testing.assert_array_equal(reader.read("cls"), feats["cls"].astype(np.float16))
    assert reader.verify() == []


def _unit_chunk_files(entry: FeatureEntry, u: int) -> set[Path]:
    files = set()
    for name in ("cls", "mean", "valid"):
        layout = entry.layout.chunk_layout(name)
        assert layout is not None
        files |= {layout.chunk_path(i).resolve() for i in layout.chunks_in(*entry.unit_bounds(u))}
    return files


@pytest.mark.usefixtures("small_chunks")
@pytest.mark.parametrize("compression", ["zstd", "none"])
def test_every_chunk_is_synced_before_its_unit_record(
    tmp_path: Path, kit: Any, compression: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each unit's record is created only after every chunk file of that unit was synced."""
    events: list[tuple[str, str]] = []
    real_fdatasync = os.fdatasync

    def fdatasync(fd: int) -> None:
        real_fdatasync(fd)
        events.append(("sync", os.readlink(f"/proc/self/fd/{fd}")))

    root = CacheRoot.from_uri(tmp_path / "c")
    real_create = CacheRoot.create_exclusive

    def create_exclusive(self: CacheRoot, relpath: str, data: bytes, **kw: Any) -> bool:
        events.append(("record", relpath))  # before: the record may appear from here on
        return real_create(self, relpath, data, **kw)

    if not Path("/proc/self/fd").is_dir():
        pytest.skip("needs /proc to name synced files")
    monkeypatch.setattr(os, "fdatasync", fdatasync)
    monkeypatch.setattr(CacheRoot, "create_exclusive", create_exclusive)
    entry = _new(root, kit, compression)
    events.clear()
    units = list(range(entry.n_units))
    _write(entry, kit.make_features(N, DIMS), units)
    assert entry.pending_units() == []
    for u in units:
        record = events.index(("record", f"{entry.relpath}/{unit_record_name(u)}"))
        synced = {Path(p) for kind, p in events[:record] if kind == "sync"}
        want = _unit_chunk_files(entry, u)
        # 6-row units: zstd 3 chunks of 2 rows per pooling, none 2 of 3 rows; 1 valid chunk
        assert len(want) == (7 if compression == "zstd" else 5)
        assert want <= synced, f"unit {u}: record created before {sorted(want - synced)} synced"


@pytest.mark.parametrize("compression", ["zstd", "none"])
def test_failed_sync_leaves_the_unit_pending(
    tmp_path: Path, kit: Any, compression: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """EIO from a chunk's fdatasync: CacheWriteError, no record; a rerun completes the entry."""
    if not Path("/proc/self/fd").is_dir():
        pytest.skip("needs /proc to name synced files")
    feats = kit.make_features(N, DIMS)
    root = CacheRoot.from_uri(tmp_path / "c")
    entry = _new(root, kit, compression)
    bad = {p for p in _unit_chunk_files(entry, 2) if p.parent.name != "valid"}
    real_fdatasync = os.fdatasync

    def fdatasync(fd: int) -> None:
        if Path(os.readlink(f"/proc/self/fd/{fd}")) in bad:
            raise OSError(errno.EIO, "Input/output error")
        real_fdatasync(fd)

    with monkeypatch.context() as mp:
        mp.setattr(os, "fdatasync", fdatasync)
        _write(entry, feats, [0, 1])
        with pytest.raises(CacheWriteError, match=r"unit 2 .*Input/output error"):
            _write(entry, feats, [2])
    assert not entry.has_unit(2)
    assert entry.pending_units() == [2, 3]
    with pytest.raises(IncompleteEntryError):
        entry.finalize()
    rerun = _new(root, kit)
    assert 2 in rerun.pending_units()
    _write(rerun, feats, rerun.pending_units())
    assert rerun.finalize()
    assert rerun.verify() == []
    clean = CacheRoot.from_uri(tmp_path / "clean")
    reference = _new(clean, kit, compression)
    _write(reference, feats, list(range(reference.n_units)))
    reference.finalize()
    a = kit.feature_files(tmp_path / "c" / rerun.relpath)
    b = kit.feature_files(tmp_path / "clean" / reference.relpath)
    assert a == b and a
    assert kit.stored_files(tmp_path / "c" / rerun.relpath / "valid") == kit.stored_files(
        tmp_path / "clean" / reference.relpath / "valid"
    )


@pytest.mark.parametrize("fsync", [True, False])
def test_scratch_mode_syncs_nothing(
    tmp_path: Path, kit: Any, fsync: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """FSYNC=False (scratch caches): no unit write waits for the disk; True: every unit does."""
    calls: list[str] = []
    for name in ("fsync", "fdatasync"):
        real = getattr(os, name)

        def counted(fd: int, n: str = name, f: Any = real) -> Any:
            calls.append(n)
            return f(fd)

        monkeypatch.setattr(os, name, counted)
    monkeypatch.setattr(writer_mod, "FSYNC", fsync)
    entry = _new(CacheRoot.from_uri(tmp_path / "c"), kit, "zstd")
    calls.clear()
    _write(entry, kit.make_features(N, DIMS), [0, 1])
    if fsync:
        assert calls.count("fdatasync") == 6 and "fsync" in calls  # 2 x (cls, mean, valid)
    else:
        assert calls == []
