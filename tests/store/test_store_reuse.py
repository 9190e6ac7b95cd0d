"""Feature spaces, row-reuse planning and copying, superseded entries, and their gc."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from embedkit.errors import CacheNotFoundError
from embedkit.probes.run import select_probe_entry
from embedkit.store import CacheKey, CacheRoot, FeatureEntry, collect_garbage, list_entries
from embedkit.store.reuse import (
    RECORD_FINGERPRINTS,
    ReusePlan,
    RowCopier,
    plan_reuse,
    row_runs,
)

DIMS = {"cls": (8,), "mean": (8,)}


def _entry(
    root: CacheRoot,
    kit: Any,
    ids: list[str],
    *,
    fps: dict[str, str] | None = None,
    complete: bool = True,
    seed: int = 0,
    **key: Any,
) -> FeatureEntry:
    """An entry of ``ids`` whose row of image ``i`` holds features derived from ``i`` alone."""
    k = kit.make_key(ids, **key)
    entry = FeatureEntry.create_or_open(
        root, k, ids=ids, shapes=DIMS, unit_rows=4, provenance={"test": True}
    )
    for u in range(entry.n_units):
        s, e = entry.unit_bounds(u)
        arrays = {
            p: np.stack([_row(i, p, seed) for i in ids[s:e]]).astype(np.float32) for p in DIMS
        }
        extra = {RECORD_FINGERPRINTS: [(fps or {}).get(i, f"quick:{i}") for i in ids[s:e]]}
        entry.begin_unit(u, arrays, valid=np.ones(e - s, bool), record_extra=extra).commit()
    if complete:
        entry.finalize()
    time.sleep(0.01)  # distinct creation times
    return FeatureEntry.open(root, k, allow_partial=not complete)


def _row(image_id: str, pooling: str, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng([int(image_id[3:]), len(pooling), seed])
    return rng.standard_normal(8).astype(np.float32)


def test_feature_space_ignores_only_the_image_list(kit: Any) -> None:
    a = kit.make_key(kit.make_ids(5))
    b = kit.make_key(kit.make_ids(9), dataset="other")
    assert a.digest() != b.digest() and a.feature_space() == b.feature_space()
    for change in ({"resolution": 128}, {"storage_dtype": "float32"}, {"poolings": ("cls",)},
                   {"model": "test/other"}):  # fmt: skip
        assert kit.make_key(kit.make_ids(5), **change).feature_space() != a.feature_space()
    other_weights = dataclasses.replace(a, weights="1" * 40)
    assert other_weights.feature_space() != a.feature_space()
    assert CacheKey.from_dict(a.to_dict()).feature_space() == a.feature_space()


def test_row_runs() -> None:
    dst = np.array([0, 1, 2, 5, 6, 7])
    src = np.array([10, 11, 3, 4, 5, 9])
    assert row_runs(dst, src) == [(0, 10, 2), (2, 3, 1), (5, 4, 2), (7, 9, 1)]
    assert row_runs(np.array([], int), np.array([], int)) == []


def test_plan_matches_ids_and_fingerprints_and_copies_exactly(tmp_path: Path, kit: Any) -> None:
    root = CacheRoot.from_uri(str(tmp_path / "cache"))
    ids = kit.make_ids(10)
    old = _entry(root, kit, ids[:6], fps={ids[2]: "quick:changed"})
    _entry(root, kit, ids[:8], storage_dtype="float32")  # another feature space
    _entry(root, kit, ids[4:10], complete=False, dataset="partial")  # not complete
    new_ids = [ids[9], *ids[:7]]  # reordered, one of another fingerprint, two unknown
    key = kit.make_key(new_ids)
    plan = plan_reuse(root, key, new_ids, [f"quick:{i}" for i in new_ids], DIMS)
    assert [s.relpath for s in plan.sources] == [old.relpath]
    expect = {i: old.ids.index(i) for i in ids[:6] if i != ids[2]}
    assert plan.n_copied == 5 and plan.n_computed == 3
    for r, image_id in enumerate(new_ids):
        if image_id in expect:
            assert plan.source_of[r] == 0 and plan.row_of[r] == expect[image_id]
        else:
            assert plan.source_of[r] == -1
    # The copier reads the very stored values, rows in the new order.
    arrays = {p: np.full((4, 8), np.nan, dtype=np.float16) for p in DIMS}
    record = RowCopier(root, plan).fill(0, 4, arrays)
    assert record == {old.key.digest(): [[1, 0, 2]]}
    for r in (1, 2, 3):
        if plan.source_of[r] >= 0:
            for p in DIMS:
                np.testing.assert_array_equal(arrays[p][r], old.read(p, ids=[new_ids[r]])[0])
    assert np.isnan(arrays["cls"][0]).all()  # computed rows are left alone
    # A resumed entry plans against its recorded sources only.
    assert (
        plan_reuse(root, key, new_ids, [f"quick:{i}" for i in new_ids], DIMS, sources=[]).n_copied
        == 0
    )
    assert ReusePlan.compute_all(3).n_computed == 3


def _make_snapshots(root: CacheRoot, kit: Any) -> tuple[FeatureEntry, FeatureEntry, FeatureEntry]:
    ids = kit.make_ids(12)
    first = _entry(root, kit, ids[:8])
    second = _entry(root, kit, ids)  # a later snapshot: superset
    f32 = _entry(root, kit, ids[:8], storage_dtype="float32")  # another feature space
    return first, second, f32


def test_cache_ls_marks_superseded_snapshots(tmp_path: Path, kit: Any) -> None:
    root = CacheRoot.from_uri(str(tmp_path / "cache"))
    first, second, f32 = _make_snapshots(root, kit)
    by_path = {s.relpath: s for s in list_entries(root)}
    assert by_path[first.relpath].superseded_by == second.key.digest()
    assert by_path[first.relpath].status.startswith("superseded by ")
    assert by_path[second.relpath].superseded_by == ""
    assert by_path[f32.relpath].superseded_by == ""
    again = {s.relpath: s for s in list_entries(root)}  # from the catalog index: the same
    assert again == by_path


def test_gc_superseded_dry_run_then_remove(tmp_path: Path, kit: Any) -> None:
    root = CacheRoot.from_uri(str(tmp_path / "cache"))
    first, second, f32 = _make_snapshots(root, kit)
    assert collect_garbage(root, dry_run=True) == []  # not asked for
    planned = collect_garbage(root, superseded=True, dry_run=True)
    assert [c.relpath for c in planned] == [first.relpath]
    assert planned[0].reason == f"superseded by {second.key.digest()[:12]}"
    assert root.exists(first.relpath)
    removed = collect_garbage(root, superseded=True)
    assert [c.relpath for c in removed] == [first.relpath]
    assert not root.exists(first.relpath) and root.exists(second.relpath)
    assert root.exists(f32.relpath)


def test_gc_keeps_a_superseded_entry_that_a_partial_entry_copies_from(
    tmp_path: Path, kit: Any
) -> None:
    root = CacheRoot.from_uri(str(tmp_path / "cache"))
    first, _, _ = _make_snapshots(root, kit)
    ids = kit.make_ids(14)
    k = kit.make_key(ids, dataset="other")
    provenance = {"reuse": {"sources": [{"relpath": first.relpath, "digest": "x", "rows": 8}]}}
    FeatureEntry.create_or_open(root, k, ids=ids, shapes=DIMS, unit_rows=4, provenance=provenance)
    assert collect_garbage(root, superseded=True, partial_older_than=None, dry_run=True) == []


def test_probe_uses_the_entry_of_the_current_image_list(tmp_path: Path, kit: Any) -> None:
    root = CacheRoot.from_uri(str(tmp_path / "cache"))
    ids = kit.make_ids(12)
    first = _entry(root, kit, ids[:8])
    second = _entry(root, kit, ids)
    for current, other in ((ids, first), (ids[:8], second)):
        entry, note = select_probe_entry(root, "demo", "test/tiny-vit", 64, ids=current)
        assert entry.key.ids_digest == kit.make_key(current).ids_digest
        assert note is not None and "current manifest" in note and other.key.short()[:12] in note
    with pytest.raises(CacheNotFoundError, match="none of them holds the current manifest"):
        select_probe_entry(root, "demo", "test/tiny-vit", 64, ids=ids[:5])
    with pytest.raises(CacheNotFoundError, match="choose one with --entry"):
        select_probe_entry(root, "demo", "test/tiny-vit", 64)
    only, note = select_probe_entry(root, "demo", "test/tiny-vit", 64, first.key.digest())
    assert only.relpath == first.relpath and note is None
