"""copy_entry (cache push/pull): local -> S3 -> local, byte-identical, resumable, safe."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from embedkit.errors import EntryExistsError, IncompleteEntryError, IntegrityError
from embedkit.store import CacheRoot, CopiedObject, FeatureEntry, copy_entry
from embedkit.store.layout import COMPLETE_FILE

from .conftest import S3Server

DIMS = {"cls": (8,), "mean": (8,), "patch": (2, 2, 4)}
N, UNIT = 23, 5


def build(root: CacheRoot, kit: Any, *, units: int | None = None) -> FeatureEntry:
    ids = kit.make_ids(N)
    key = kit.make_key(ids, poolings=tuple(DIMS))
    entry = FeatureEntry.create_or_open(
        root, key, ids=ids, shapes=DIMS, unit_rows=UNIT, provenance={"created_by": "test"}
    )
    feats = kit.make_features(N, DIMS)
    for u in range(entry.n_units if units is None else units):
        s, e = entry.unit_bounds(u)
        entry.write_unit(u, {p: a[s:e] for p, a in feats.items()}, valid=np.ones(e - s, bool))
    if units is None:
        entry.finalize()
    return entry


def test_push_to_s3_and_pull_back_byte_identical(
    s3_server: S3Server, tmp_path: Path, kit: Any
) -> None:
    local = CacheRoot.from_uri(tmp_path / "a")
    remote = CacheRoot.from_uri(s3_server.new_uri())
    back = CacheRoot.from_uri(tmp_path / "b")
    src = build(local, kit)
    seen: list[CopiedObject] = []
    pushed = copy_entry(local, remote, src.key.digest()[:10], on_object=seen.append)
    assert pushed.is_complete
    assert seen[-1].path == COMPLETE_FILE  # written last
    assert not any(o.skipped for o in seen)
    pulled = copy_entry(remote, back, src.relpath)
    assert pulled.verify() == []
    src_files = local.files(src.relpath)
    assert set(back.files(src.relpath)) == set(src_files)
    for path in src_files:
        want = local.read_bytes(f"{src.relpath}/{path}")
        assert back.read_bytes(f"{src.relpath}/{path}") == want, path
    for p in DIMS:
        np.testing.assert_array_equal(pulled.read(p), src.read(p))


def test_existing_complete_destination_needs_overwrite(
    root: CacheRoot, tmp_path: Path, kit: Any
) -> None:
    src_root = CacheRoot.from_uri(tmp_path / "src")
    src = build(src_root, kit)
    copy_entry(src_root, root, src.relpath)
    with pytest.raises(EntryExistsError, match="--overwrite"):
        copy_entry(src_root, root, src.relpath)
    again = copy_entry(src_root, root, src.relpath, overwrite=True)
    assert again.verify() == []


def test_interrupted_copy_resumes_and_skips_present_objects(
    root: CacheRoot, tmp_path: Path, kit: Any
) -> None:
    src_root = CacheRoot.from_uri(tmp_path / "src")
    src = build(src_root, kit)
    copy_entry(src_root, root, src.relpath)
    # simulate an interruption: no COMPLETE.json, two chunk objects missing
    root.remove_tree(f"{src.relpath}/{COMPLETE_FILE}")
    root.remove_tree(f"{src.relpath}/cls/c.3.0")
    root.remove_tree(f"{src.relpath}/patch/c.0.0.0.0")
    with pytest.raises(IncompleteEntryError):
        FeatureEntry.open(root, src.relpath)
    seen: list[CopiedObject] = []
    done = copy_entry(src_root, root, src.relpath, on_object=seen.append)
    copied = {o.path for o in seen if not o.skipped and not o.path.endswith(".json")}
    assert copied == {"cls/c.3.0", "patch/c.0.0.0.0"}
    assert done.verify() == []


def test_damaged_destination_is_left_incomplete(root: CacheRoot, tmp_path: Path, kit: Any) -> None:
    src_root = CacheRoot.from_uri(tmp_path / "src")
    src = build(src_root, kit)
    copy_entry(src_root, root, src.relpath)
    root.remove_tree(f"{src.relpath}/{COMPLETE_FILE}")
    chunk = f"{src.relpath}/mean/c.2.0"
    blob = bytearray(root.read_bytes(chunk))
    blob[-3] ^= 0xFF  # same size: the resumed copy skips it, verification catches it
    root.write_bytes_atomic(chunk, bytes(blob))
    with pytest.raises(IntegrityError, match=r"(?s)unit 2 .*--overwrite"):
        copy_entry(src_root, root, src.relpath)
    assert not FeatureEntry.open(root, src.relpath, allow_partial=True).is_complete
    assert copy_entry(src_root, root, src.relpath, overwrite=True).verify() == []


def test_partial_source_is_refused(tmp_path: Path, kit: Any) -> None:
    src_root = CacheRoot.from_uri(tmp_path / "src")
    src = build(src_root, kit, units=2)
    with pytest.raises(IncompleteEntryError, match="incomplete"):
        copy_entry(src_root, CacheRoot.from_uri(tmp_path / "dst"), src.relpath)


def test_cli_push_pull_and_gc(s3_server: S3Server, tmp_path: Path, kit: Any) -> None:
    from typer.testing import CliRunner

    from embedkit.cli import app

    local = CacheRoot.from_uri(tmp_path / "a")
    src = build(local, kit)
    remote = s3_server.new_uri()
    runner = CliRunner()
    digest = src.key.digest()[:8]
    pushed = runner.invoke(
        app, ["cache", "push", digest, "--cache", str(tmp_path / "a"), "--to", remote]
    )
    assert pushed.exit_code == 0, pushed.output
    assert "verified" in pushed.output
    pulled = runner.invoke(
        app, ["cache", "pull", digest, "--from", remote, "--cache", str(tmp_path / "b")]
    )
    assert pulled.exit_code == 0, pulled.output
    np.testing.assert_array_equal(
        FeatureEntry.open(CacheRoot.from_uri(tmp_path / "b"), digest).read("cls"), src.read("cls")
    )
    again = runner.invoke(
        app, ["cache", "pull", digest, "--from", remote, "--cache", str(tmp_path / "b")]
    )
    assert again.exit_code == 0, again.output  # already complete there: nothing to do
    assert "already there" in again.output
    dry = runner.invoke(
        app, ["cache", "gc", "--cache", remote, "--dry-run", "--unused-since", "2999-01-01"]
    )
    assert dry.exit_code == 0, dry.output
    assert f"would remove {src.relpath}" in dry.output
    assert "would remove 1 entries" in dry.output
    assert CacheRoot.from_uri(remote).exists(f"{src.relpath}/{COMPLETE_FILE}")
    bad = runner.invoke(app, ["cache", "gc", "--cache", remote, "--partial-older-than", "soon"])
    assert bad.exit_code == 2
