"""The local read-through cache (``--local-cache``): fill, warm reuse, repair, refresh, resume."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from embedkit.errors import ConfigError, IncompleteEntryError, IntegrityError
from embedkit.store import (
    CacheRoot,
    FeatureEntry,
    local_copy_status,
    open_local_copy,
    remove_entry,
)
from embedkit.store.layout import COMPLETE_FILE, LAST_USED_FILE, unit_record_name

from .conftest import S3Server

#: A chunk object of any array, in the flat (``c.<i>.0``) or nested (``c/<i>/0``) key style.
CHUNK_KEY = re.compile(r"/c[./]\d")

DIMS = {"cls": (8,), "mean": (8,)}
N, UNIT = 23, 5  # 5 units, the last one short


def build(root: CacheRoot, kit: Any, *, seed: int = 0, finalize: bool = True) -> FeatureEntry:
    ids = kit.make_ids(N)
    key = kit.make_key(ids, poolings=tuple(DIMS))
    entry = FeatureEntry.create_or_open(
        root, key, ids=ids, shapes=DIMS, unit_rows=UNIT, provenance={"created_by": "test"}
    )
    feats = kit.make_features(N, DIMS, seed=seed)
    for u in range(entry.n_units):
        s, e = entry.unit_bounds(u)
        entry.write_unit(u, {p: a[s:e] for p, a in feats.items()}, valid=np.ones(e - s, bool))
    if finalize:
        entry.finalize()
    return FeatureEntry.open(root, entry.relpath, allow_partial=not finalize)


def assert_same_features(a: FeatureEntry, b: FeatureEntry) -> None:
    assert a.ids == b.ids
    for pooling in (*DIMS, "cls+mean"):
        np.testing.assert_array_equal(a.read(pooling), b.read(pooling))
    rows = [b.ids[i] for i in (22, 3, 11)]
    np.testing.assert_array_equal(a.read("mean", ids=rows), b.read("mean", ids=rows))


@pytest.fixture
def remote_gets(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every object GET of remote roots in this process: CacheRoot reads and zarr's store."""
    import s3fs

    seen: list[str] = []
    read_bytes = CacheRoot.read_bytes

    def counting_read(self: CacheRoot, relpath: str) -> bytes:
        if self.local_path is None:
            seen.append(relpath)
        return read_bytes(self, relpath)

    cat_file = s3fs.S3FileSystem._cat_file

    async def counting_cat(self: Any, path: str, *args: Any, **kwargs: Any) -> Any:
        seen.append(path)
        return await cat_file(self, path, *args, **kwargs)

    monkeypatch.setattr(CacheRoot, "read_bytes", counting_read)
    monkeypatch.setattr(s3fs.S3FileSystem, "_cat_file", counting_cat)
    return seen


def test_fill_gives_a_valid_local_entry_with_the_remote_features(
    root: CacheRoot, tmp_path: Path, kit: Any
) -> None:
    remote = build(root, kit)
    copy = open_local_copy(remote, tmp_path / "local")
    assert (copy.state, copy.units_fetched, copy.units_checked) == ("filled", 5, 0)
    assert copy.bytes_fetched > 0
    local = copy.entry
    assert local.root.local_path == (tmp_path / "local").resolve()
    assert local.relpath == remote.relpath and local.is_complete
    assert local.verify() == []
    assert_same_features(local, remote)
    # same layout: every remote object is there, byte for byte (the usage mark aside)
    remote_files = {p for p in root.files(remote.relpath) if p != LAST_USED_FILE}
    assert remote_files <= set(local.root.files(local.relpath))
    for path in remote_files:
        want = root.read_bytes(f"{remote.relpath}/{path}")
        assert local.root.read_bytes(f"{local.relpath}/{path}") == want, path
    assert local_copy_status(remote, tmp_path / "local").startswith("current")
    # the remote entry counts as used (gc --unused-since) although its data was read only once
    assert root.exists(f"{remote.relpath}/{LAST_USED_FILE}")


def test_warm_path_reads_no_remote_data(
    s3_server: S3Server, tmp_path: Path, kit: Any, remote_gets: list[str]
) -> None:
    root = CacheRoot.from_uri(s3_server.new_uri())
    remote = build(root, kit)
    direct = {p: remote.read(p) for p in DIMS}
    remote_gets.clear()
    open_local_copy(remote, tmp_path / "local")
    chunk_gets = [p for p in remote_gets if CHUNK_KEY.search(p)]
    # cls, mean and valid of each of the 5 units and the one ids chunk: each fetched once
    assert len(chunk_gets) == len(set(chunk_gets)) == 5 * 3 + 1

    remote_gets.clear()
    again = open_local_copy(FeatureEntry.open(root, remote.relpath), tmp_path / "local")
    assert (again.state, again.units_fetched, again.bytes_fetched) == ("warm", 0, 0)
    for p in DIMS:
        np.testing.assert_array_equal(again.entry.read(p), direct[p])
    fetched = sorted(p.rsplit("/", 1)[-1] for p in remote_gets)
    # only the two identity objects (plus zarr.json once more by FeatureEntry.open)
    assert set(fetched) == {"zarr.json", COMPLETE_FILE.rsplit("/", 1)[-1]}, remote_gets

    # The remote data may even vanish: the warm copy never needs it.
    for path in root.files(remote.relpath):
        if CHUNK_KEY.search("/" + path):
            root.remove_tree(f"{remote.relpath}/{path}")
    warm = open_local_copy(FeatureEntry.open(root, remote.relpath), tmp_path / "local")
    assert warm.state == "warm"
    np.testing.assert_array_equal(warm.entry.read("cls"), direct["cls"])


def _flip(path: Path, *, keep_mtime: bool = False) -> None:
    st = path.stat()
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    if keep_mtime:
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_damaged_local_copy_is_detected_and_refetched(
    s3_server: S3Server, tmp_path: Path, kit: Any
) -> None:
    root = CacheRoot.from_uri(s3_server.new_uri())
    remote = build(root, kit)
    local_dir = tmp_path / "local"
    entry_dir = open_local_copy(remote, local_dir).entry.root.url(remote.relpath)

    _flip(Path(entry_dir) / "cls/c.2.0")
    assert "1 local files changed" in local_copy_status(remote, local_dir)
    repaired = open_local_copy(remote, local_dir)
    assert (repaired.state, repaired.units_fetched) == ("repaired", 1)
    assert repaired.entry.verify() == []
    assert_same_features(repaired.entry, remote)

    (Path(entry_dir) / "mean/c.4.0").unlink()  # a lost file
    again = open_local_copy(remote, local_dir)
    assert (again.state, again.units_fetched) == ("repaired", 1)
    assert again.entry.verify() == []

    # Damage that keeps size and mtime passes the cheap check; full_check finds it.
    _flip(Path(entry_dir) / "mean/c.0.0", keep_mtime=True)
    checked = open_local_copy(remote, local_dir, full_check=True)
    assert (checked.state, checked.units_checked, checked.units_fetched) == ("repaired", 5, 1)
    assert_same_features(checked.entry, remote)
    clean = open_local_copy(remote, local_dir, full_check=True)
    assert (clean.state, clean.units_checked, clean.units_fetched) == ("warm", 5, 0)


def test_changed_remote_entry_is_fetched_again(
    s3_server: S3Server, tmp_path: Path, kit: Any
) -> None:
    root = CacheRoot.from_uri(s3_server.new_uri())
    old = build(root, kit, seed=0)
    local_dir = tmp_path / "local"
    old_cls = open_local_copy(old, local_dir).entry.read("cls")
    remove_entry(root, old.relpath)
    new = build(root, kit, seed=1)  # same key, same path, other features
    assert new.relpath == old.relpath
    assert local_copy_status(new, local_dir).startswith("stale")
    fresh = open_local_copy(new, local_dir)
    assert (fresh.state, fresh.units_fetched) == ("refreshed", 5)
    assert_same_features(fresh.entry, new)
    assert not np.array_equal(fresh.entry.read("cls"), old_cls)


def test_interrupted_fill_resumes(
    s3_server: S3Server, tmp_path: Path, kit: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    import embedkit.store.readcache as readcache

    root = CacheRoot.from_uri(s3_server.new_uri())
    remote = build(root, kit)
    real = vars(readcache)["copy_object"]

    def failing(src: CacheRoot, dst: CacheRoot, relpath: str, path: str, *a: Any) -> bool:
        if "/c.3." in path:
            raise ConnectionError("network down")
        return real(src, dst, relpath, path, *a)

    monkeypatch.setattr(readcache, "copy_object", failing)
    monkeypatch.setattr(readcache, "COPY_THREADS", 8)  # all 5 units start before unit 3 fails
    with pytest.raises(ConnectionError):
        open_local_copy(remote, tmp_path / "local")
    assert "partial, 4 of 5 units" in local_copy_status(remote, tmp_path / "local")
    with pytest.raises(IncompleteEntryError):  # the partial copy is not a complete entry
        FeatureEntry.open(CacheRoot.from_uri(tmp_path / "local"), remote.relpath)

    monkeypatch.setattr(readcache, "copy_object", real)
    resumed = open_local_copy(remote, tmp_path / "local")
    assert (resumed.state, resumed.units_fetched, resumed.units_checked) == ("resumed", 1, 4)
    assert resumed.entry.verify() == []
    assert_same_features(resumed.entry, remote)


def test_damaged_remote_unit_is_refused(s3_server: S3Server, tmp_path: Path, kit: Any) -> None:
    root = CacheRoot.from_uri(s3_server.new_uri())
    remote = build(root, kit)
    record_path = f"{remote.relpath}/{unit_record_name(1)}"
    record = json.loads(root.read_bytes(record_path))
    record["checksums"]["cls"] = "00000000"
    root.write_bytes_atomic(record_path, json.dumps(record).encode())
    with pytest.raises(IntegrityError, match=r"Unit 1 .* remote entry is damaged"):
        open_local_copy(remote, tmp_path / "local")
    local = CacheRoot.from_uri(tmp_path / "local")
    assert not local.exists(f"{remote.relpath}/{COMPLETE_FILE}")


def test_partial_remote_and_remote_local_cache_are_refused(
    root: CacheRoot, tmp_path: Path, kit: Any
) -> None:
    partial = build(root, kit, finalize=False)
    with pytest.raises(IncompleteEntryError, match="not a complete entry"):
        open_local_copy(partial, tmp_path / "local")
    with pytest.raises(ConfigError, match="Expected a local directory"):
        open_local_copy(partial, "memory://elsewhere")
    if root.local_path is not None:
        with pytest.raises(ConfigError, match="choose another --local-cache"):
            open_local_copy(partial, root.local_path)


_WORKER = """
import json, sys
from embedkit.store import CacheRoot, FeatureEntry, open_local_copy
from embedkit.store.layout import COMPLETE_FILE, LAST_USED_FILE, unit_record_name
remote = FeatureEntry.open(CacheRoot.from_uri(sys.argv[1]), sys.argv[2])
copy = open_local_copy(remote, sys.argv[3])
print(json.dumps({"state": copy.state, "fetched": copy.units_fetched,
                  "sum": float(copy.entry.read("cls").astype("float64").sum())}))
"""


def test_concurrent_readers_fill_one_copy_once(
    s3_server: S3Server, tmp_path: Path, kit: Any
) -> None:
    uri = s3_server.new_uri()
    remote = build(CacheRoot.from_uri(uri), kit)
    env = {**os.environ, **s3_server.env, "PYTHONPATH": os.getcwd()}
    cmd = [sys.executable, "-c", _WORKER, uri, remote.relpath, str(tmp_path / "local")]
    procs = [
        subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(3)
    ]
    results = []
    for proc in procs:
        out, errs = proc.communicate(timeout=300)
        assert proc.returncode == 0, errs
        results.append(json.loads(out.strip().splitlines()[-1]))
    assert sum(r["fetched"] for r in results) == 5  # every unit fetched by exactly one process
    assert sorted(r["state"] for r in results) == ["filled", "warm", "warm"]
    want = float(remote.read("cls").astype(np.float64).sum())
    assert all(r["sum"] == want for r in results)
    local = FeatureEntry.open(CacheRoot.from_uri(tmp_path / "local"), remote.relpath)
    assert local.verify() == []


def test_cli_cache_info_and_verify_with_a_local_cache(
    s3_server: S3Server, tmp_path: Path, kit: Any
) -> None:
    from typer.testing import CliRunner

    from embedkit.cli import app

    uri = s3_server.new_uri()
    remote = build(CacheRoot.from_uri(uri), kit)
    local_dir = str(tmp_path / "local")
    runner = CliRunner()
    base = ["--cache", uri, "--local-cache", local_dir]
    info = runner.invoke(app, ["cache", "info", remote.key.short(), *base])
    assert info.exit_code == 0, info.output
    assert "local copy none in" in info.output

    verified = runner.invoke(app, ["cache", "verify", *base])
    assert verified.exit_code == 0, verified.output
    assert "1 ok, 0 with problems" in verified.output
    info = runner.invoke(app, ["cache", "info", remote.key.short(), *base])
    assert "local copy current:" in info.output

    # verify re-checks every unit of the copy: a flip that keeps size and mtime is repaired
    _flip(Path(local_dir) / remote.relpath / "cls/c.1.0", keep_mtime=True)
    repaired = runner.invoke(app, ["cache", "verify", remote.key.short(), *base])
    assert repaired.exit_code == 0, repaired.output
    np.testing.assert_array_equal(
        FeatureEntry.open(CacheRoot.from_uri(local_dir), remote.relpath).read("cls"),
        remote.read("cls"),
    )
    # a damaged remote unit that the copy must fetch makes verify fail, naming it
    (Path(local_dir) / remote.relpath / "mean/c.2.0").unlink()
    chunk = f"{remote.relpath}/mean/c.2.0"
    root = CacheRoot.from_uri(uri)
    blob = bytearray(root.read_bytes(chunk))
    blob[len(blob) // 2] ^= 0xFF
    root.write_bytes_atomic(chunk, bytes(blob))
    bad = runner.invoke(app, ["cache", "verify", *base])
    assert bad.exit_code == 1
    assert "Unit 2" in bad.output and "remote entry is damaged" in bad.output
