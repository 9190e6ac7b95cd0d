"""The write path: chunk scans (NaN/Inf + crc32c), begin/commit pipelining, preallocation."""

from __future__ import annotations

import errno
import json
from pathlib import Path
from typing import Any

import google_crc32c
import numpy as np
import pytest

import embedkit.store.checks as checks
import embedkit.store.chunkio as chunkio
import embedkit.store.writer as writer_mod
from embedkit.errors import CacheWriteError, EntryExistsError, IntegrityError
from embedkit.store import CacheRoot, FeatureEntry
from embedkit.store.layout import unit_record_name

DIMS = {"cls": (8,), "mean": (8,)}
N, UNIT = 23, 6  # 4 units, the last one short; 6-row units hold 2 chunks of 3 rows


@pytest.fixture(autouse=True)
def two_chunks_per_unit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(writer_mod, "CHUNK_BYTES", {"none": 3 * 16, "zstd": 2 * 16})


def _new(root: CacheRoot, kit: Any, compression: str = "none") -> FeatureEntry:
    ids = kit.make_ids(N)
    return FeatureEntry.create_or_open(
        root,
        kit.make_key(ids, poolings=tuple(DIMS)),
        ids=ids,
        shapes=DIMS,
        unit_rows=UNIT,
        provenance={},
        compression=compression,
    )


def _unit(feats: dict[str, np.ndarray], entry: FeatureEntry, u: int) -> dict[str, np.ndarray]:
    s, e = entry.unit_bounds(u)
    return {p: a[s:e] for p, a in feats.items()}


def _records(root: CacheRoot, entry: FeatureEntry) -> dict[int, dict[str, Any]]:
    out = {}
    for u in range(entry.n_units):
        record = json.loads(root.read_bytes(f"{entry.relpath}/{unit_record_name(u)}"))
        out[u] = {k: record[k] for k in ("rows", "checksum_algorithm", "checksums", "n_valid")}
    return out


# ---- crc32c_combine and scan ---------------------------------------------------------------


def test_crc32c_combine_equals_the_crc_of_the_concatenation() -> None:
    rng = np.random.default_rng(0)
    for _ in range(200):
        a = rng.integers(0, 256, int(rng.integers(0, 3000)), dtype=np.uint8).tobytes()
        b = rng.integers(0, 256, int(rng.choice([0, 1, 7, 4096, 5001])), dtype=np.uint8).tobytes()
        joined = checks.crc32c_combine(google_crc32c.value(a), google_crc32c.value(b), len(b))
        assert joined == google_crc32c.value(a + b), (len(a), len(b))
    with pytest.raises(ValueError, match="len_b"):
        checks.crc32c_combine(0, 0, -1)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_scan_sums_in_pieces_and_finds_nan_in_any_piece(
    dtype: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(checks, "SCAN_PIECE", 64)  # many pieces
    a = np.random.default_rng(1).standard_normal((37, 5)).astype(dtype)
    found = checks.scan(a, check=True)
    assert found.finite and found.nbytes == a.nbytes
    if checks.FAST_CRC32C:
        assert found.crc32c == google_crc32c.value(a.tobytes())
    for flat_index in (0, 90, a.size - 1):  # first, a middle and the last piece
        bad = a.copy()
        bad.reshape(-1)[flat_index] = np.inf if flat_index % 2 else np.nan
        assert not checks.scan(bad, check=True).finite, flat_index
        assert checks.scan(bad, check=False).finite  # valid masks etc. are not checked
    assert checks.scan(np.zeros(0, dtype), check=True).finite


# ---- begin_unit / commit ---------------------------------------------------------------------


@pytest.mark.parametrize("compression", ["none", "zstd"])
def test_pipelined_units_equal_serial_ones(tmp_path: Path, kit: Any, compression: str) -> None:
    """Beginning unit k + 1 before committing unit k writes the same files and records."""
    feats = kit.make_features(N, DIMS)
    serial_root = CacheRoot.from_uri(tmp_path / "serial")
    serial = _new(serial_root, kit, compression)
    for u in range(serial.n_units):
        rows = _unit(feats, serial, u)
        serial.write_unit(u, rows, valid=np.ones(len(rows["cls"]), bool))
    serial.finalize()

    piped_root = CacheRoot.from_uri(tmp_path / "piped")
    piped = _new(piped_root, kit, compression)
    layout = piped.layout.chunk_layout("cls")
    assert layout is not None
    assert len(layout.chunks_in(*piped.unit_bounds(0))) == (2 if compression == "none" else 3)
    pending = None
    for u in [2, 0, 3, 1]:
        rows = _unit(feats, piped, u)
        begun = piped.begin_unit(u, rows, valid=np.ones(len(rows["cls"]), bool))
        assert not piped.has_unit(u)  # no record before the commit
        if pending is not None:
            pending.commit()
        pending = begun
    assert pending is not None
    pending.commit()
    with pytest.raises(EntryExistsError, match="already committed"):
        pending.commit()
    piped.finalize()

    assert _records(piped_root, piped) == _records(serial_root, serial)
    assert kit.feature_files(tmp_path / "piped" / piped.relpath) == kit.feature_files(
        tmp_path / "serial" / serial.relpath
    )
    reader = FeatureEntry.open(piped_root, piped.key)
    np.testing.assert_array_equal(reader.read("cls"), feats["cls"].astype(np.float16))
    assert reader.verify() == []


def test_unit_checksum_joins_its_chunks(tmp_path: Path, kit: Any) -> None:
    """The record's crc32c (joined from 2 chunk scans) is the crc32c of the unit's bytes."""
    if checks.CHECKSUM_ALGORITHM != "crc32c" or not checks.FAST_CRC32C:
        pytest.skip("needs the C crc32c")
    root = CacheRoot.from_uri(tmp_path / "c")
    entry = _new(root, kit)
    feats = kit.make_features(N, DIMS)
    rows = _unit(feats, entry, 1)
    entry.write_unit(1, rows, valid=np.ones(UNIT, bool))
    record = json.loads(root.read_bytes(f"{entry.relpath}/{unit_record_name(1)}"))
    want = google_crc32c.value(rows["mean"].astype(np.float16).tobytes())
    assert record["checksums"]["mean"] == f"{want:08x}"


@pytest.mark.parametrize("compression", ["none", "zstd"])
def test_nan_in_a_later_chunk_fails_the_commit_and_leaves_no_record(
    tmp_path: Path, kit: Any, compression: str
) -> None:
    root = CacheRoot.from_uri(tmp_path / "c")
    entry = _new(root, kit, compression)
    feats = kit.make_features(N, DIMS)
    rows = _unit(feats, entry, 1)  # rows 6-11: img00006..img00011
    rows["mean"] = rows["mean"].copy()
    rows["mean"][5, 3] = np.nan  # in the unit's second chunk
    begun = entry.begin_unit(1, rows, valid=np.ones(UNIT, bool))
    with pytest.raises(IntegrityError, match=r"pooling 'mean'.*1 image\(s\) contain NaN.*img00011"):
        begun.commit()
    assert entry.pending_units() == [0, 1, 2, 3]
    rows["mean"][5, 3] = 0.0  # the rerun computes finite features: the unit is redone
    entry.write_unit(1, rows, valid=np.ones(UNIT, bool))
    assert entry.has_unit(1)
    np.testing.assert_array_equal(
        entry.read("mean", rows=slice(6, 12)), rows["mean"].astype(np.float16)
    )


# ---- preallocation ---------------------------------------------------------------------------


@pytest.mark.skipif(chunkio._fallocate is None, reason="no fallocate here")
def test_chunk_files_are_preallocated_and_exact(
    tmp_path: Path, kit: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []
    real = chunkio._fallocate
    assert real is not None

    def spy(fd: int, nbytes: int) -> int:
        calls.append(nbytes)
        return real(fd, nbytes)

    monkeypatch.setattr(chunkio, "_fallocate", spy)
    root = CacheRoot.from_uri(tmp_path / "c")
    entry = _new(root, kit)
    feats = kit.make_features(N, DIMS)
    entry.write_unit(3, _unit(feats, entry, 3), valid=np.ones(N - 18, bool))  # 5-row unit
    assert 3 * 16 in calls and 2 * 16 in calls  # a full chunk, and the 2 rows of the edge one
    cdir = tmp_path / "c" / entry.relpath / "cls"
    assert (cdir / "c.7.0").stat().st_size == 3 * 16  # edge chunk: 2 rows + a 1-row hole
    np.testing.assert_array_equal(
        entry.read("cls", rows=slice(18, 23)), feats["cls"][18:].astype(np.float16)
    )


@pytest.mark.parametrize(
    ("err", "fails"), [(errno.ENOSPC, True), (errno.EOPNOTSUPP, False), (errno.EINVAL, False)]
)
def test_preallocation_fails_only_when_space_runs_out(
    tmp_path: Path, kit: Any, monkeypatch: pytest.MonkeyPatch, err: int, fails: bool
) -> None:
    monkeypatch.setattr(chunkio, "_fallocate", lambda fd, nbytes: err)
    root = CacheRoot.from_uri(tmp_path / "c")
    entry = _new(root, kit)
    rows = _unit(kit.make_features(N, DIMS), entry, 0)
    if fails:
        with pytest.raises(CacheWriteError, match="No space left"):
            entry.write_unit(0, rows, valid=np.ones(UNIT, bool))
        assert not entry.has_unit(0)
    else:  # filesystems without fallocate: plain writes
        entry.write_unit(0, rows, valid=np.ones(UNIT, bool))
        assert entry.has_unit(0)
        np.testing.assert_array_equal(
            entry.read("cls", rows=slice(0, UNIT)), rows["cls"].astype(np.float16)
        )


def test_writer_thread_commits_every_unit(tmp_path: Path, kit: Any) -> None:
    """The extraction writer (pipelined when units queue up) records every unit once."""
    from embedkit.extract.runner import _UnitWriter

    root = CacheRoot.from_uri(tmp_path / "c")
    entry = _new(root, kit)
    feats = kit.make_features(N, DIMS)
    writer = _UnitWriter(entry)
    for u in range(entry.n_units):
        rows = _unit(feats, entry, u)
        n = len(rows["cls"])
        writer.submit(u, rows, np.ones(n, bool), [])
    writer.close()
    assert sorted(writer.units) == list(range(entry.n_units))
    entry.finalize()
    reader = FeatureEntry.open(root, entry.key)
    np.testing.assert_array_equal(reader.read("mean"), feats["mean"].astype(np.float16))
    assert reader.verify() == []
