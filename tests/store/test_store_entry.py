from __future__ import annotations

import json
from pathlib import Path

import filelock
import numpy as np
import pytest
import zarr

from embedkit.errors import (
    CacheNotFoundError,
    CacheWriteError,
    EntryExistsError,
    IncompleteEntryError,
    IntegrityError,
)
from embedkit.store import CacheRoot, FeatureEntry, remove_entry
from embedkit.store.layout import unit_record_name
from embedkit.store.lease import Leases

DIMS = {"cls": (8,), "mean": (8,)}
N, UNIT = 23, 5  # 5 units, the last one short


def new_entry(root: CacheRoot, kit, n: int = N, dims=DIMS, **key_kw) -> FeatureEntry:  # type: ignore[no-untyped-def]
    ids = kit.make_ids(n)
    key = kit.make_key(ids, poolings=tuple(dims), **key_kw)
    return FeatureEntry.create_or_open(
        root, key, ids=ids, shapes=dims, unit_rows=UNIT, provenance={"created_by": "test"}
    )


def unit_arrays(entry: FeatureEntry, feats: dict[str, np.ndarray], u: int) -> dict[str, np.ndarray]:
    s, e = entry.unit_bounds(u)
    return {p: a[s:e] for p, a in feats.items()}


def write_all(entry: FeatureEntry, feats: dict[str, np.ndarray], units: list[int]) -> None:
    for u in units:
        s, e = entry.unit_bounds(u)
        entry.write_unit(u, unit_arrays(entry, feats, u), valid=np.ones(e - s, bool))


def test_round_trip_random_order(root: CacheRoot, kit) -> None:  # type: ignore[no-untyped-def]
    entry = new_entry(root, kit)
    assert (entry.n_units, entry.unit_rows) == (5, 5)
    assert entry.unit_bounds(4) == (20, 23)
    feats = kit.make_features(N, DIMS)
    order = list(np.random.default_rng(1).permutation(entry.n_units))
    write_all(entry, feats, order)
    entry.finalize({"note": "x"})
    assert entry.is_complete

    e2 = FeatureEntry.open(root, entry.key)
    want = {p: a.astype(np.float16) for p, a in feats.items()}
    full = e2.read("cls")
    assert full.dtype == np.float16
    np.testing.assert_array_equal(full, want["cls"])
    ids = [e2.ids[i] for i in (17, 2, 2, 22)]
    np.testing.assert_array_equal(e2.read("mean", ids=ids), want["mean"][[17, 2, 2, 22]])
    np.testing.assert_array_equal(e2.read("cls", rows=slice(3, 12)), want["cls"][3:12])
    np.testing.assert_array_equal(e2.read("cls", rows=np.array([9, 0])), want["cls"][[9, 0]])
    both = e2.read("cls+mean", out_dtype=np.float32)
    assert both.shape == (N, 16)
    assert both.dtype == np.float32
    np.testing.assert_array_equal(both, np.concatenate([want["cls"], want["mean"]], 1))
    np.testing.assert_array_equal(e2.read("cls+mean", rows=slice(20, 23)), both[20:23])
    assert e2.valid_mask().all()
    assert e2.completion()["note"] == "x"  # type: ignore[index]
    assert e2.verify() == []
    # opened by digest and by relpath too
    assert FeatureEntry.open(root, entry.key.digest()).relpath == entry.relpath
    assert FeatureEntry.open(root, entry.key.short()[:8]).relpath == entry.relpath
    assert FeatureEntry.open(root, entry.relpath).n_images == N


def test_written_chunks_match_unit_geometry(root: CacheRoot, kit) -> None:  # type: ignore[no-untyped-def]
    entry = new_entry(root, kit, dims={"cls": (8,), "patch": (2, 3, 4)}, storage_dtype="float32")
    arr = zarr.open_array(root.zarr_store(entry.relpath, read_only=True), path="cls")
    assert arr.chunks == (UNIT, 8)
    assert arr.shards is None
    assert arr.dtype == np.float32
    patch = zarr.open_array(root.zarr_store(entry.relpath, read_only=True), path="patch")
    assert patch.chunks == (UNIT, 2, 3, 4)
    assert patch.dtype == np.float16
    # a plain zarr-python reader sees the same data
    feats = kit.make_features(N, {"cls": (8,), "patch": (2, 3, 4)})
    write_all(entry, feats, list(range(entry.n_units)))
    np.testing.assert_array_equal(arr[:], feats["cls"])
    np.testing.assert_array_equal(patch[:], feats["patch"].astype(np.float16))


def test_unknown_pooling_and_missing_ids(root: CacheRoot, kit) -> None:  # type: ignore[no-untyped-def]
    entry = new_entry(root, kit)
    write_all(entry, kit.make_features(N, DIMS), list(range(entry.n_units)))
    with pytest.raises(
        CacheNotFoundError, match=r"'patch' is not stored.*derived: \['cls\+mean'\]"
    ):
        entry.read("patch")
    with pytest.raises(CacheNotFoundError, match=r"2 of 3 requested ids.*nope1, nope2"):
        entry.read("cls", ids=["img00001", "nope1", "nope2"])


def test_resume(root: CacheRoot, kit) -> None:  # type: ignore[no-untyped-def]
    entry = new_entry(root, kit)
    feats = kit.make_features(N, DIMS)
    write_all(entry, feats, [0, 3])
    del entry
    with pytest.raises(IncompleteEntryError, match=r"2 of 5 units written; rerun the same"):
        FeatureEntry.open(root, new_entry_key(kit))
    entry = new_entry(root, kit)
    assert entry.done_units() == {0, 3}
    assert entry.pending_units() == [1, 2, 4]
    with pytest.raises(IncompleteEntryError, match=r"3 of 5 units.*1, 2, 4"):
        entry.finalize()
    with pytest.raises(EntryExistsError, match="Unit 3"):
        write_all(entry, feats, [3])
    partial = FeatureEntry.open(root, entry.key, allow_partial=True)
    np.testing.assert_array_equal(
        partial.read("cls", rows=slice(0, 5)), feats["cls"][:5].astype(np.float16)
    )
    assert "no completion record" in " ".join(partial.verify())
    write_all(entry, feats, entry.pending_units())
    entry.finalize()
    np.testing.assert_array_equal(
        FeatureEntry.open(root, entry.key).read("cls"), feats["cls"].astype(np.float16)
    )
    with pytest.raises(EntryExistsError, match="already complete"):
        entry.finalize()


def new_entry_key(kit):  # type: ignore[no-untyped-def]
    return kit.make_key(kit.make_ids(N), poolings=tuple(DIMS))


def test_chunk_without_record_is_rewritten(root: CacheRoot, kit) -> None:  # type: ignore[no-untyped-def]
    entry = new_entry(root, kit)
    feats = kit.make_features(N, DIMS)
    # simulate a kill after the chunk landed but before the unit record was written
    arr = zarr.open_array(root.zarr_store(entry.relpath), path="cls")
    arr[5:10] = np.full((5, 8), 7.0, np.float16)
    assert 1 in entry.pending_units()
    write_all(entry, feats, list(range(entry.n_units)))
    entry.finalize()
    np.testing.assert_array_equal(entry.read("cls")[5:10], feats["cls"][5:10].astype(np.float16))
    assert entry.verify() == []


def test_skipped_images(root: CacheRoot, kit) -> None:  # type: ignore[no-untyped-def]
    entry = new_entry(root, kit)
    feats = kit.make_features(N, DIMS)
    feats["cls"][6] = np.nan  # garbage in an invalid row is fine: it is zeroed
    write_all(entry, feats, [0, 2, 3, 4])
    valid = np.ones(5, bool)
    valid[1] = False
    with pytest.raises(IntegrityError, match="invalid without a reason: img00006"):
        entry.write_unit(1, unit_arrays(entry, feats, 1), valid=valid)
    entry.write_unit(
        1, unit_arrays(entry, feats, 1), valid=valid, skipped=[("img00006", "truncated PNG")]
    )
    entry.finalize()
    assert entry.skipped() == [("img00006", "truncated PNG")]
    assert entry.completion()["n_valid"] == N - 1  # type: ignore[index]
    assert not entry.valid_mask()[6]
    assert entry.valid_mask().sum() == N - 1
    assert (entry.read("cls")[6] == 0).all()
    assert entry.verify() == []


@pytest.mark.parametrize(
    ("value", "why"),
    [(np.nan, "contain NaN or Inf"), (np.inf, "contain NaN or Inf"), (1e6, "overflow float16")],
)
def test_nonfinite_rejected(root: CacheRoot, kit, value: float, why: str) -> None:  # type: ignore[no-untyped-def]
    entry = new_entry(root, kit)
    feats = kit.make_features(N, DIMS)
    feats["mean"][7, 3] = value
    feats["mean"][9, 0] = value
    with pytest.raises(IntegrityError, match=rf"2 image\(s\) {why}.*img00007, img00009"):
        write_all(entry, feats, [1])
    assert entry.pending_units() == list(range(5))  # nothing recorded


def test_float32_storage_keeps_large_values(root: CacheRoot, kit) -> None:  # type: ignore[no-untyped-def]
    entry = new_entry(root, kit, storage_dtype="float32")
    feats = kit.make_features(N, DIMS)
    feats["cls"][0, 0] = 1e6
    write_all(entry, feats, list(range(entry.n_units)))
    assert entry.read("cls")[0, 0] == np.float32(1e6)


def test_write_unit_checks_shapes(root: CacheRoot, kit) -> None:  # type: ignore[no-untyped-def]
    entry = new_entry(root, kit)
    feats = kit.make_features(N, DIMS)
    bad = unit_arrays(entry, feats, 0)
    bad["cls"] = bad["cls"][:, :7]
    with pytest.raises(IntegrityError, match=r"expected shape \(5, 8\), got \(5, 7\)"):
        entry.write_unit(0, bad, valid=np.ones(5, bool))
    with pytest.raises(IntegrityError, match="expected arrays for poolings"):
        entry.write_unit(0, {"cls": feats["cls"][:5]}, valid=np.ones(5, bool))
    with pytest.raises(IntegrityError, match="bool array of shape"):
        entry.write_unit(0, unit_arrays(entry, feats, 0), valid=np.ones(4, bool))


def test_verify_finds_corruption(root: CacheRoot, kit) -> None:  # type: ignore[no-untyped-def]
    entry = new_entry(root, kit)
    feats = kit.make_features(N, DIMS)
    write_all(entry, feats, list(range(entry.n_units)))
    entry.finalize()
    assert entry.verify() == []
    # flip one stored value behind the records' back, through zarr directly
    arr = zarr.open_array(root.zarr_store(entry.relpath), path="cls")
    arr[12, 3] = -np.asarray(arr[12, 3]) - 1
    # and lose one unit record
    root.backend.delete(f"{entry.relpath}/{unit_record_name(4)}")
    problems = entry.verify()
    assert any("unit 2 (rows 10-15): checksum mismatch in cls" in p for p in problems)
    assert any("unit 4 (rows 20-23): no completion record" in p for p in problems)
    assert len(problems) == 2


def test_verify_finds_corrupt_chunk_file_local(tmp_path: Path, kit) -> None:  # type: ignore[no-untyped-def]
    root = CacheRoot.from_uri(tmp_path / "c")
    entry = new_entry(root, kit)
    write_all(entry, kit.make_features(N, DIMS), list(range(entry.n_units)))
    entry.finalize()
    layout = entry.layout.chunk_layout("mean")
    assert layout is not None
    chunk, other = layout.chunk_path(1), layout.chunk_path(3)
    assert chunk.is_file() and chunk.name == "c.1.0"
    chunk.write_bytes(other.read_bytes())  # a valid chunk, wrong content
    assert entry.verify() == ["unit 1 (rows 5-10): checksum mismatch in mean"]


def test_mismatched_reopen(root: CacheRoot, kit) -> None:  # type: ignore[no-untyped-def]
    entry = new_entry(root, kit)
    ids = kit.make_ids(N)
    with pytest.raises(IntegrityError, match=r"do not match key\.ids_digest"):
        FeatureEntry.create_or_open(
            root, entry.key, ids=ids[::-1], shapes=DIMS, unit_rows=UNIT, provenance={}
        )
    with pytest.raises(IntegrityError, match=r"stores shapes .* but this run produces"):
        FeatureEntry.create_or_open(
            root,
            entry.key,
            ids=ids,
            shapes={"cls": (8,), "mean": (9,)},
            unit_rows=UNIT,
            provenance={},
        )
    with pytest.raises(IntegrityError, match="Expected shapes for exactly"):
        FeatureEntry.create_or_open(
            root, entry.key, ids=ids, shapes={"cls": (8,)}, unit_rows=UNIT, provenance={}
        )
    # reopening keeps the stored unit_rows
    again = FeatureEntry.create_or_open(
        root, entry.key, ids=ids, shapes=DIMS, unit_rows=999, provenance={}
    )
    assert again.unit_rows == UNIT


def test_half_created_entry_is_recreated(root: CacheRoot, kit) -> None:  # type: ignore[no-untyped-def]
    key = new_entry_key(kit)
    zarr.create_group(root.zarr_store(key.relpath()))  # creation killed before the layout finished
    with pytest.raises(CacheNotFoundError):
        FeatureEntry.open(root, key)
    entry = new_entry(root, kit)
    assert entry.pending_units() == list(range(5))


def test_open_missing(root: CacheRoot, kit) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(CacheNotFoundError, match="No cache entry at"):
        FeatureEntry.open(root, new_entry_key(kit))
    with pytest.raises(CacheNotFoundError, match="digest starting with 'abcdef'"):
        FeatureEntry.open(root, "abcdef")


def test_info(root: CacheRoot, kit) -> None:  # type: ignore[no-untyped-def]
    entry = new_entry(root, kit)
    write_all(entry, kit.make_features(N, DIMS), [0, 1])
    info = entry.info()
    assert (info["units_done"], info["units_total"], info["complete"]) == (2, 5, False)
    assert info["poolings"]["cls"] == {"shape": [N, 8], "dtype": "float16"}
    assert info["provenance"] == {"created_by": "test"}
    assert info["bytes_on_disk"] > 0
    json.dumps(info)


def test_remove_entry(root: CacheRoot, kit) -> None:  # type: ignore[no-untyped-def]
    entry = new_entry(root, kit)
    remove_entry(root, entry.key)
    assert not root.exists(entry.relpath)
    with pytest.raises(CacheNotFoundError):
        remove_entry(root, entry.key)


def test_remove_refused_while_locked(tmp_path: Path, kit) -> None:  # type: ignore[no-untyped-def]
    root = CacheRoot.from_uri(tmp_path / "c")
    entry = new_entry(root, kit)
    # a copy into the entry holds its lock file (a separate lock object = a separate open file
    # description, like another process)
    other = filelock.FileLock(str(root.local_path / f"{entry.relpath}.lock"))  # type: ignore[operator]
    with other, pytest.raises(CacheWriteError, match="being written by another process"):
        remove_entry(root, entry.key)
    remove_entry(root, entry.key)
    assert not root.exists(entry.relpath)


def test_remove_refused_while_a_job_holds_a_claim(root: CacheRoot, kit) -> None:  # type: ignore[no-untyped-def]
    entry = new_entry(root, kit)
    with Leases(root, entry.relpath, ttl_s=30) as job:
        assert job.claim_unit(entry) == 0
        with pytest.raises(CacheWriteError, match="being written by another job"):
            remove_entry(root, entry.key)
    # leaving the block released the claim: the entry may go now
    remove_entry(root, entry.key)
    assert not root.exists(entry.relpath)


def test_one_read_only_table_of_derived_poolings() -> None:
    from embedkit.store import DERIVED_POOLINGS
    from embedkit.store.layout import DERIVED_POOLINGS as in_layout

    assert DERIVED_POOLINGS is in_layout
    assert dict(DERIVED_POOLINGS) == {
        "cls+mean": ("cls", "mean"),
        "pooled+mean": ("pooled", "mean"),
    }
    with pytest.raises(TypeError):
        DERIVED_POOLINGS["x+y"] = ("x", "y")  # type: ignore[index]


def test_pooled_plus_mean_is_read_from_its_parts(root: CacheRoot, kit) -> None:  # type: ignore[no-untyped-def]
    """ConvNeXt entries store ``pooled`` and ``mean``; ``pooled+mean`` concatenates them."""
    dims = {"pooled": (6,), "mean": (4,)}
    entry = new_entry(root, kit, dims=dims, model="dinov3/convnext-base")
    feats = kit.make_features(N, dims)
    write_all(entry, feats, list(range(entry.n_units)))
    entry.finalize()
    reader = FeatureEntry.open(root, entry.key)
    want = np.concatenate([feats["pooled"], feats["mean"]], 1).astype(np.float16)
    np.testing.assert_array_equal(reader.read("pooled+mean"), want)
    ids = [reader.ids[i] for i in (4, 0)]
    np.testing.assert_array_equal(reader.read("pooled+mean", ids=ids), want[[4, 0]])
    with pytest.raises(CacheNotFoundError, match=r"derived: \['pooled\+mean'\]"):
        reader.read("cls+mean")
