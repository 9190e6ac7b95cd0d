from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import zarr
from rich.console import Console

from embedkit.errors import CacheNotFoundError
from embedkit.store import (
    CacheRoot,
    FeatureEntry,
    find_entry,
    list_entries,
    render_entries,
    render_info,
    verify_root,
)


def build(root: CacheRoot, kit, *, model: str, units: int | None, seed: int = 0) -> FeatureEntry:  # type: ignore[no-untyped-def]
    ids = kit.make_ids(12)
    key = kit.make_key(ids, model=model)
    entry = FeatureEntry.create_or_open(
        root,
        key,
        ids=ids,
        shapes={"cls": (4,), "mean": (4,)},
        unit_rows=4,
        provenance={"created_at": "2026-01-01T00:00:00", "created_by": "alice@node1"},
    )
    feats = kit.make_features(12, {"cls": (4,), "mean": (4,)}, seed=seed)
    todo = range(entry.n_units) if units is None else range(units)
    for u in todo:
        s, e = entry.unit_bounds(u)
        entry.write_unit(u, {p: a[s:e] for p, a in feats.items()}, valid=np.ones(e - s, bool))
    if units is None:
        entry.finalize()
    return entry


def test_list_find_render(root: CacheRoot, kit) -> None:  # type: ignore[no-untyped-def]
    done = build(root, kit, model="dinov3/vitb16", units=None)
    partial = build(root, kit, model="dinov2/vitl14", units=1)
    summaries = list_entries(root)
    assert [s.relpath for s in summaries] == sorted([done.relpath, partial.relpath])
    by_model = {s.model: s for s in summaries}
    s_done, s_part = by_model["dinov3/vitb16"], by_model["dinov2/vitl14"]
    assert (s_done.complete, s_done.units_done, s_done.units_total) == (True, 3, 3)
    assert (s_part.complete, s_part.status) == (False, "partial 1/3")
    assert s_done.poolings == {"cls": 4, "mean": 4}
    assert (s_done.n_images, s_done.storage_dtype, s_done.resolution) == (12, "float16", 64)
    assert s_done.digest == done.key.digest()
    assert s_done.created_by == "alice@node1"
    assert s_done.created_at.startswith("2026")
    assert s_done.bytes_on_disk > 0

    assert find_entry(root, done.key.digest()).relpath == done.relpath
    assert find_entry(root, done.key.digest()[:6]).relpath == done.relpath
    assert find_entry(root, partial.relpath).relpath == partial.relpath
    assert not find_entry(root, partial.key.short()).is_complete
    if root.local_path is not None:
        assert find_entry(root, str(root.local_path / done.relpath)).relpath == done.relpath

    out = io.StringIO()
    Console(file=out, width=200).print(render_entries(summaries))
    assert "dinov3/vitb16" in out.getvalue()
    assert "partial 1/3" in out.getvalue()
    text = render_info(done.info())
    assert done.key.digest() in text
    assert "3 of 3 written" in text

    health = verify_root(root)
    assert health[done.relpath] == []
    assert any("no COMPLETE.json" in p for p in health[partial.relpath])


def test_ambiguous_prefix(root: CacheRoot, kit) -> None:  # type: ignore[no-untyped-def]
    a = build(root, kit, model="m/a", units=1)
    # a second entry whose digest shares the first 8 hex chars (a real collision is unlikely,
    # so lay out its group by hand under a name with that prefix)
    twin = f"demo/m--b/64px-{a.key.short()[:8]}00000000.zarr"
    zarr.create_group(root.zarr_store(twin), attributes=a.attrs)
    with pytest.raises(CacheNotFoundError, match=r"ambiguous; it matches 2 entries") as info:
        find_entry(root, a.key.digest()[:6])
    assert a.relpath in str(info.value)
    assert twin in str(info.value)
    assert find_entry(root, a.key.short()).relpath == a.relpath  # more characters resolve it
    with pytest.raises(CacheNotFoundError, match="at least 6 hex"):
        find_entry(root, a.key.digest()[:5])
    other = "0" * 6 if not a.key.digest().startswith("000000") else "1" * 6
    with pytest.raises(CacheNotFoundError, match="starting with"):
        find_entry(root, other)


def test_list_empty_root(root: CacheRoot) -> None:
    assert list_entries(root) == []
    assert verify_root(root) == {}


def test_find_absolute_path_outside_root(tmp_path: Path, kit) -> None:  # type: ignore[no-untyped-def]
    elsewhere = CacheRoot.from_uri(tmp_path / "elsewhere")
    entry = build(elsewhere, kit, model="m/x", units=None)
    here = CacheRoot.from_uri(tmp_path / "here")
    found = find_entry(here, str(tmp_path / "elsewhere" / entry.relpath))
    assert found.key == entry.key
