"""Entries open in the Zarr ecosystem: zarr-python and xarray read an entry written by `extract`
without warnings, and the README's "Reading an entry without embedkit" snippets run as written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zarr

from embedkit.errors import CacheNotFoundError
from embedkit.extract import ExtractionRequest, extract
from embedkit.store import CacheRoot, FeatureEntry, list_entries, plan_gc
from embedkit.store.layout import (
    COMPLETE_FILE,
    IMAGE_ARRAY,
    LAYOUT_VERSION,
    RECORDS_DIR,
    UNITS_DIR,
    VALID_ARRAY,
    dimension_names,
)

from ..conftest import write_manifest

README = Path(__file__).resolve().parents[2] / "README.md"
SECTION = "Reading an entry without embedkit"

xr = pytest.importorskip("xarray")


def _readme_code() -> str:
    """The Python blocks of the README section, joined in order."""
    blocks: list[str] = []
    lines: list[str] = []
    in_section = in_block = False
    for line in README.read_text().splitlines():
        if line.startswith("## "):
            in_section = line[3:].strip() == SECTION
        elif in_section and line.strip() == "```python":
            in_block, lines = True, []
        elif in_section and in_block and line.strip() == "```":
            in_block = False
            blocks.append("\n".join(lines))
        elif in_block:
            lines.append(line)
    return "\n\n".join(blocks) + "\n"


@pytest.fixture(scope="module")
def extracted(
    demo_data: Path, model_cache: Path, tmp_path_factory: pytest.TempPathFactory
) -> FeatureEntry:
    """An entry written by `extract` on a tiny model, with the patch grid, under
    ``<tmp>/embedkit-cache`` (where the README snippets look)."""
    folder = tmp_path_factory.mktemp("eco")
    manifest = write_manifest(demo_data, cache=str(folder / "embedkit-cache"), name="eco.yaml")
    request = ExtractionRequest(
        model="test/tiny-vit",
        dataset="demo",
        resolution=64,
        num_workers=0,
        unit_rows=8,
        patch_tokens=True,
    )
    entry = extract(request, manifest=manifest, model_cache_dir=model_cache).entry
    assert entry.is_complete
    return entry


def _path(entry: FeatureEntry) -> str:
    return entry.root.url(entry.relpath)


def test_zarr_opens_an_entry_without_warnings(extracted: FeatureEntry) -> None:
    entry = extracted
    # a read leaves the usage mark too: it must not show either
    FeatureEntry.open(entry.root, entry.relpath).read("cls")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for consolidated in (True, False):
            group = zarr.open_group(_path(entry), mode="r", use_consolidated=consolidated)
            members = dict(group.members(max_depth=None))
            assert sorted(members) == sorted([*entry.poolings, IMAGE_ARRAY, VALID_ARRAY])
            group.tree()
    assert Path(_path(entry), RECORDS_DIR, "last_used.json").is_file()
    assert Path(_path(entry), COMPLETE_FILE).is_file()
    dims = {name: members[name].metadata.dimension_names for name in members}  # type: ignore[union-attr]
    assert dims == {
        "cls": ("image", "feature"),
        "mean": ("image", "feature"),
        "patch": ("image", "row", "col", "feature"),
        IMAGE_ARRAY: ("image",),
        VALID_ARRAY: ("image",),
    }
    assert group.attrs["layout_version"] == LAYOUT_VERSION
    assert group.attrs["key"] == entry.key.to_dict()


def test_xarray_opens_an_entry_indexed_by_image_id(extracted: FeatureEntry) -> None:
    entry = extracted
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds = xr.open_zarr(_path(entry))
    assert list(ds.indexes) == ["image"]
    assert list(ds["image"].values) == list(entry.ids)
    assert dict(ds.sizes) == {"image": 24, "feature": 32, "row": 4, "col": 4}
    for pooling in entry.poolings:
        np.testing.assert_array_equal(ds[pooling].values, entry.read(pooling))
    some = [entry.ids[17], entry.ids[3]]
    np.testing.assert_array_equal(ds["cls"].sel(image=some).values, entry.read("cls", ids=some))
    np.testing.assert_array_equal(ds[VALID_ARRAY].values, entry.valid_mask())


def test_readme_snippets_run_against_an_extracted_entry(extracted: FeatureEntry) -> None:
    """Each block of the README section runs, in order, warnings as errors, in a fresh
    process; then a check compares what they read with embedkit's reads."""
    entry = extracted
    code = _readme_code()
    assert "import zarr" in code and "xr.open_zarr" in code and "np.fromfile" in code
    want = {p: entry.read(p).tolist() for p in ("cls",)}
    check = textwrap.dedent(
        f"""
        import json as _json
        _want = _json.loads({json.dumps(json.dumps(want))})
        _ids = {list(entry.ids)!r}
        assert path.endswith({entry.relpath.rsplit("/", 1)[-1]!r}), path
        assert ids == _ids and image_ids == _ids
        assert model == {entry.key.model!r}
        assert X.dtype == np.float16 and X.tolist() == _want["cls"]
        assert features.tolist() == _want["cls"] and mask.all() and mask.dtype == bool
        assert x.tolist() == _want["cls"][:2]
        assert usable.sizes["image"] == {len(entry.ids)}
        assert grid.dims == ("feature",) and grid.shape == (32,)
        print("OK")
        """
    )
    env = dict(os.environ, PYTHONWARNINGS="error")
    proc = subprocess.run(
        [sys.executable, "-W", "error", "-c", code + check],
        cwd=Path(entry.root.url()).parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().endswith("OK"), proc.stdout


def test_poolings_of_different_sizes_get_their_own_dimension(tmp_path: Path, kit: Any) -> None:
    assert dimension_names({"cls": (8,), "mean": (8,), "patch": (2, 2, 8)}) == {
        "cls": ("image", "feature"),
        "mean": ("image", "feature"),
        "patch": ("image", "row", "col", "feature"),
    }
    dims = {"cls": (8,), "mean": (12,)}
    assert dimension_names(dims) == {
        "cls": ("image", "cls_feature"),
        "mean": ("image", "mean_feature"),
    }
    root = CacheRoot.from_uri(tmp_path / "c")
    ids = kit.make_ids(10)
    feats = kit.make_features(10, dims)
    entry = FeatureEntry.create_or_open(
        root, kit.make_key(ids), ids=ids, shapes=dims, unit_rows=5, provenance={}
    )  # the key's poolings are cls and mean
    for u in range(entry.n_units):
        s, e = entry.unit_bounds(u)
        entry.write_unit(u, {p: a[s:e] for p, a in feats.items()}, valid=np.ones(e - s, bool))
    entry.finalize()
    ds = xr.open_zarr(entry.root.url(entry.relpath))
    assert dict(ds.sizes) == {"image": 10, "cls_feature": 8, "mean_feature": 12}
    np.testing.assert_array_equal(ds["mean"].values, feats["mean"].astype(np.float16))


def test_a_pooling_cannot_take_the_name_of_another_array(tmp_path: Path, kit: Any) -> None:
    root = CacheRoot.from_uri(tmp_path / "c")
    ids = kit.make_ids(4)
    key = kit.make_key(ids, poolings=("cls", "valid"))
    with pytest.raises(ValueError, match=r"taken by the entry's other arrays"):
        FeatureEntry.create_or_open(
            root, key, ids=ids, shapes={"cls": (4,), "valid": (4,)}, unit_rows=2, provenance={}
        )


def test_an_entry_of_layout_1_is_not_read_and_gc_keeps_it_as_complete(
    tmp_path: Path, kit: Any
) -> None:
    """An entry written by an earlier embedkit (its attrs say layout 1, its completion record
    sits beside the arrays): a clear error on open, left out of `cache ls`; gc counts it as the
    complete entry it is, so the default (partial) rule never deletes expensive old features;
    only the explicit unused rule removes it."""
    import datetime as dt

    root = CacheRoot.from_uri(tmp_path / "c")
    ids = kit.make_ids(6)
    dims = {"cls": (4,)}
    entry = FeatureEntry.create_or_open(
        root, kit.make_key(ids, poolings=("cls",)), ids=ids, shapes=dims, unit_rows=3, provenance={}
    )
    for u in range(entry.n_units):
        s, e = entry.unit_bounds(u)
        entry.write_unit(u, {"cls": np.ones((e - s, 4))}, valid=np.ones(e - s, bool))
    entry.finalize()
    folder = tmp_path / "c" / entry.relpath
    meta = json.loads((folder / "zarr.json").read_text())
    meta["attributes"]["layout_version"] = 1
    (folder / "zarr.json").write_text(json.dumps(meta))
    (folder / COMPLETE_FILE).rename(folder / "COMPLETE.json")
    (folder / UNITS_DIR).rename(folder / "units")
    with pytest.raises(CacheNotFoundError, match=r"layout 1, written by an earlier embedkit"):
        FeatureEntry.open(root, entry.relpath)
    assert list_entries(root) == []
    later = dt.datetime.now(dt.UTC) + dt.timedelta(days=8)
    assert plan_gc(root, now=later) == []
    planned = plan_gc(root, now=later, unused_since=later)
    assert [(c.relpath, c.complete) for c in planned] == [(entry.relpath, True)]


def test_every_backend_gives_an_entry_zarr_and_xarray_open_silently(
    root: CacheRoot, kit: Any
) -> None:
    """Local, memory:// and s3:// roots: the same members, no warning, the same values."""
    ids = kit.make_ids(12)
    dims = {"cls": (6,), "mean": (6,), "patch": (2, 2, 6)}
    feats = kit.make_features(12, dims)
    key = kit.make_key(ids, poolings=tuple(dims))
    entry = FeatureEntry.create_or_open(root, key, ids=ids, shapes=dims, unit_rows=4, provenance={})
    for u in range(entry.n_units):
        s, e = entry.unit_bounds(u)
        entry.write_unit(u, {p: a[s:e] for p, a in feats.items()}, valid=np.ones(e - s, bool))
    entry.finalize()
    FeatureEntry.open(root, entry.relpath).read("cls")  # the usage mark
    assert root.exists(f"{entry.relpath}/{RECORDS_DIR}/last_used.json")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        store = root.zarr_store(entry.relpath, read_only=True)
        group = zarr.open_group(store, mode="r", use_consolidated=False)
        assert sorted(n for n, _ in group.members(max_depth=None)) == sorted(
            [*dims, IMAGE_ARRAY, VALID_ARRAY]
        )
        ds = xr.open_zarr(store)
    assert list(ds["image"].values) == ids
    np.testing.assert_array_equal(ds["patch"].values, feats["patch"].astype(np.float16))
