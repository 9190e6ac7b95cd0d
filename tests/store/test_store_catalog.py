from __future__ import annotations

import io
from pathlib import Path
from typing import Any

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
from embedkit.store.layout import COMPLETE_FILE


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
    assert any(f"no {COMPLETE_FILE}" in p for p in health[partial.relpath])


def test_an_entry_removed_while_listing_is_left_out(
    root: CacheRoot,
    kit: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from embedkit.store import catalog

    kept = build(root, kit, model="dinov3/vitb16", units=None)
    gone = build(root, kit, model="dinov2/vitl14", units=None)
    real = vars(catalog)["read_attrs"]

    def removed_meanwhile(r: CacheRoot, relpath: str) -> dict[str, object]:
        if relpath == gone.relpath:  # `gc` or `--overwrite` deleted it after it was listed
            raise FileNotFoundError(f"{relpath}/zarr.json")
        return real(r, relpath)

    monkeypatch.setattr(catalog, "read_attrs", removed_meanwhile)
    assert [s.relpath for s in list_entries(root, use_index=False)] == [kept.relpath]


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


def _complete_rest(entry: FeatureEntry, kit) -> None:  # type: ignore[no-untyped-def]
    writer = FeatureEntry.create_or_open(
        entry.root,
        entry.key,
        ids=list(entry.ids),
        shapes={p: entry.shapes[p] for p in entry.poolings},
        unit_rows=entry.unit_rows,
        provenance={},
    )
    feats = kit.make_features(12, {"cls": (4,), "mean": (4,)})
    for u in writer.pending_units():
        s, e = writer.unit_bounds(u)
        writer.write_unit(u, {p: a[s:e] for p, a in feats.items()}, valid=np.ones(e - s, bool))
    writer.finalize()


def test_index_serves_unchanged_complete_entries(
    root: CacheRoot,
    kit: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import datetime as dt
    import json

    import embedkit.store.catalog as catalog
    from embedkit.store import plan_gc
    from embedkit.store.index import INDEX_PATH

    done = build(root, kit, model="m/done", units=None)
    other = build(root, kit, model="m/other", units=None)
    partial = build(root, kit, model="m/partial", units=1)
    assert not root.exists(INDEX_PATH)
    first = list_entries(root)
    assert first == list_entries(root, use_index=False)
    index = json.loads(root.read_bytes(INDEX_PATH))
    assert sorted(index["entries"]) == sorted([done.relpath, other.relpath])  # complete only
    # the index is no entry: verify and gc do not see it
    assert sorted(verify_root(root)) == sorted([done.relpath, other.relpath, partial.relpath])
    later = dt.datetime(2100, 1, 1, tzinfo=dt.UTC)
    planned = plan_gc(root, partial_older_than=dt.timedelta(days=1), unused_since=later, now=later)
    assert sorted(c.relpath for c in planned) == sorted(
        [done.relpath, other.relpath, partial.relpath]
    )

    summarised: list[str] = []
    real = catalog._summary

    def counting(r: CacheRoot, relpath: str) -> catalog.EntrySummary:
        summarised.append(relpath)
        return real(r, relpath)

    monkeypatch.setattr(catalog, "_summary", counting)
    assert list_entries(root) == first
    assert summarised == [partial.relpath]  # partial entries are always read afresh
    summarised.clear()
    assert list_entries(root, model="m/done") == [s for s in first if s.model == "m/done"]
    assert list_entries(root, dataset="nope") == []
    assert summarised == [partial.relpath, partial.relpath]


def test_index_follows_entries_changed_behind_its_back(root: CacheRoot, kit) -> None:  # type: ignore[no-untyped-def]
    import json

    from embedkit.store.index import INDEX_PATH

    gone = build(root, kit, model="m/gone", units=None)
    replaced = build(root, kit, model="m/replaced", units=None)
    partial = build(root, kit, model="m/partial", units=1)
    list_entries(root)  # writes the index

    root.remove_tree(gone.relpath)  # removed without embedkit
    added = build(root, kit, model="m/added", units=None)
    _complete_rest(partial, kit)  # the partial entry completes
    root.remove_tree(replaced.relpath)  # replaced by another extraction of the same key
    again = FeatureEntry.create_or_open(
        root,
        replaced.key,
        ids=list(replaced.ids),
        shapes={"cls": (4,), "mean": (4,)},
        unit_rows=4,
        provenance={"created_at": "2026-06-01T00:00:00", "created_by": "bob@node2"},
    )
    assert again.relpath == replaced.relpath

    fresh = list_entries(root, use_index=False)
    listed = list_entries(root)
    assert listed == fresh
    by_model = {s.model: s for s in listed}
    assert sorted(by_model) == ["m/added", "m/partial", "m/replaced"]
    assert by_model["m/partial"].complete
    assert (by_model["m/replaced"].complete, by_model["m/replaced"].created_by) == (
        False,
        "bob@node2",
    )
    index = json.loads(root.read_bytes(INDEX_PATH))
    assert sorted(index["entries"]) == sorted([added.relpath, partial.relpath])


def test_index_on_a_read_only_root_is_not_written(tmp_path: Path, kit) -> None:  # type: ignore[no-untyped-def]
    import dataclasses

    from embedkit.store.index import INDEX_PATH

    root = CacheRoot.from_uri(tmp_path / "c")
    build(root, kit, model="m/a", units=None)
    reader = dataclasses.replace(root, writable=False)
    assert list_entries(reader) == list_entries(root, use_index=False)
    assert not root.exists(INDEX_PATH)
    # a corrupt index is ignored and rewritten
    root.write_bytes_atomic(INDEX_PATH, b"{not json")
    assert list_entries(root) == list_entries(root, use_index=False)
    assert root.read_bytes(INDEX_PATH).startswith(b"{")
    assert b"m/a" in root.read_bytes(INDEX_PATH)


def test_cli_cache_ls_json_filters_on_s3(s3_server, kit) -> None:  # type: ignore[no-untyped-def]
    import json

    from typer.testing import CliRunner

    from embedkit.cli import app

    uri = s3_server.new_uri()
    root = CacheRoot.from_uri(uri)
    a = build(root, kit, model="dinov3/vitb16", units=None)
    build(root, kit, model="dinov2/vitl14", units=1)
    runner = CliRunner()

    def ls(*args: str) -> list[dict[str, Any]]:
        result = runner.invoke(app, ["cache", "ls", "--cache", uri, "--json", *args])
        assert result.exit_code == 0, result.output
        rows = json.loads(result.output)
        assert isinstance(rows, list)
        return rows

    assert sorted(r["model"] for r in ls()) == ["dinov2/vitl14", "dinov3/vitb16"]
    (row,) = ls("--model", "dinov3/vitb16")
    assert (row["relpath"], row["digest"], row["complete"]) == (a.relpath, a.key.digest(), True)
    assert row["poolings"] == {"cls": 4, "mean": 4} and row["n_images"] == 12
    assert (row["storage_dtype"], row["resolution"], row["created_by"]) == (
        "float16",
        64,
        "alice@node1",
    )
    assert row["bytes_on_disk"] == root.size_bytes(a.relpath)
    (part,) = ls("--model", "dinov2/vitl14", "--dataset", "demo")
    assert (part["complete"], part["units_done"], part["units_total"]) == (False, 1, 3)
    assert ls("--dataset", "other") == []
    table = runner.invoke(app, ["cache", "ls", "--cache", uri])
    assert (
        table.exit_code == 0 and "partial 1/3" in table.output and "dinov3/vitb16" in table.output
    )
