"""S3 roots (moto on 127.0.0.1) end to end, credentials hygiene, and read-only users.

The generic store suite already runs on s3:// through the ``root`` fixture; these tests cover
what is specific to remote and read-only roots.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from embedkit.errors import CacheWriteError
from embedkit.store import CacheRoot, FeatureEntry, list_entries, remove_entry, verify_root
from embedkit.store.layout import LAST_USED_FILE

from .conftest import S3Server

DIMS = {"cls": (8,), "mean": (8,)}
N, UNIT = 23, 5


def build(root: CacheRoot, kit: Any, *, model: str = "test/tiny-vit") -> FeatureEntry:
    ids = kit.make_ids(N)
    key = kit.make_key(ids, poolings=tuple(DIMS), model=model)
    entry = FeatureEntry.create_or_open(
        root, key, ids=ids, shapes=DIMS, unit_rows=UNIT, provenance={"created_by": "test"}
    )
    feats = kit.make_features(N, DIMS)
    for u in range(entry.n_units):
        s, e = entry.unit_bounds(u)
        entry.write_unit(u, {p: a[s:e] for p, a in feats.items()}, valid=np.ones(e - s, bool))
    entry.finalize()
    return entry


def test_s3_entry_end_to_end_with_explicit_storage_options(s3_server: S3Server, kit: Any) -> None:
    secret = "explicit-secret-7c1d0e2b"
    options = {"key": "explicit-key-id-93af", "secret": secret}
    root = CacheRoot.from_uri(s3_server.new_uri(), storage_options=options)
    entry = build(root, kit)
    feats = {p: a.astype(np.float16) for p, a in kit.make_features(N, DIMS).items()}

    (summary,) = list_entries(root)
    assert (summary.relpath, summary.complete, summary.units_done) == (entry.relpath, True, 5)
    back = FeatureEntry.open(root, summary.digest[:8])
    np.testing.assert_array_equal(back.read("cls"), feats["cls"])
    ids = [back.ids[i] for i in (22, 0, 7)]
    np.testing.assert_array_equal(back.read("mean", ids=ids), feats["mean"][[22, 0, 7]])
    both = back.read("cls+mean")
    np.testing.assert_array_equal(both, np.concatenate([feats["cls"], feats["mean"]], 1))
    assert verify_root(root) == {entry.relpath: []}

    # no credential ends up in any object of the entry (attrs, records, completion, usage mark)
    files = root.files(entry.relpath)
    assert LAST_USED_FILE in files  # the read above marked the entry as used
    for path in files:
        blob = root.read_bytes(f"{entry.relpath}/{path}")
        for value in (secret, options["key"], *s3_server.env.values()):
            assert value.encode() not in blob, (path, value)


def test_s3_corrupt_chunk_object_is_reported(s3_server: S3Server, kit: Any) -> None:
    root = CacheRoot.from_uri(s3_server.new_uri())
    entry = build(root, kit)
    chunk = f"{entry.relpath}/cls/c.1.0"
    blob = bytearray(root.read_bytes(chunk))
    blob[len(blob) // 2] ^= 0xFF
    root.write_bytes_atomic(chunk, bytes(blob))
    problems = FeatureEntry.open(root, entry.relpath).verify()
    assert problems
    assert all("unit 1 (rows 5-10)" in p for p in problems), problems
    assert any("cls" in p for p in problems)


_S3_WRITES = {
    "put_object",
    "delete_object",
    "delete_objects",
    "create_multipart_upload",
    "upload_part",
    "copy_object",
    "create_bucket",
}


def test_s3_read_only_credentials(
    s3_server: S3Server, kit: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    import s3fs

    uri = s3_server.new_uri()
    entry = build(CacheRoot.from_uri(uri), kit)
    real_call = s3fs.S3FileSystem._call_s3

    async def denied(self: Any, method: str, *args: Any, **kwargs: Any) -> Any:
        if method in _S3_WRITES:  # what s3fs raises for an AccessDenied answer
            raise PermissionError("Access Denied")
        return await real_call(self, method, *args, **kwargs)

    monkeypatch.setattr(s3fs.S3FileSystem, "_call_s3", denied)
    root = CacheRoot.from_uri(uri)
    # listing, reading and verifying work
    assert [s.relpath for s in list_entries(root)] == [entry.relpath]
    assert FeatureEntry.open(root, entry.relpath).read("cls").shape == (N, 8)
    assert verify_root(root) == {entry.relpath: []}
    # every write fails with one clear message
    with pytest.raises(CacheWriteError, match=r"permission denied.*read access only"):
        build(root, kit, model="other/model")
    with pytest.raises(CacheWriteError, match=r"permission denied.*s3:PutObject"):
        root.write_bytes_atomic("x.json", b"{}")
    with pytest.raises(CacheWriteError, match="Cannot remove"):
        remove_entry(root, entry.relpath)


def test_local_read_only_root_lists_and_reads(
    tmp_path: Path, kit: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    entry = build(CacheRoot.from_uri(tmp_path / "c"), kit)
    # tests run as root, which ignores permissions: make the access check say "read-only"
    real_access = __import__("os").access
    monkeypatch.setattr(
        "embedkit.store.backend.os.access",
        lambda path, mode: False if mode & 2 else real_access(path, mode),
    )
    root = CacheRoot.from_uri(tmp_path / "c")
    assert not root.writable
    assert [s.relpath for s in list_entries(root)] == [entry.relpath]
    assert FeatureEntry.open(root, entry.relpath).read("mean").shape == (N, 8)
    assert not root.exists(f"{entry.relpath}/{LAST_USED_FILE}")  # readers leave no trace
    with pytest.raises(CacheWriteError, match=r"Cannot create or resume a cache entry in .*read"):
        build(root, kit, model="other/model")
    with pytest.raises(CacheWriteError, match="read access only"):
        remove_entry(root, entry.relpath)


def test_local_permission_error_on_write_is_mapped(
    tmp_path: Path, kit: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = CacheRoot.from_uri(tmp_path / "c")

    def denied(*args: Any, **kwargs: Any) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr("embedkit.store.backend.os.replace", denied)
    with pytest.raises(CacheWriteError, match=r"Cannot write a\.json in .*permission denied"):
        root.write_bytes_atomic("a.json", b"{}")
    assert not list((tmp_path / "c").iterdir())  # the temporary file was cleaned up


@pytest.mark.slow
def test_cli_extract_to_s3_then_verify(s3_server: S3Server, tmp_path: Path) -> None:
    """`embedkit extract --cache s3://...` with the tiny model; credentials only in the env."""
    from embedkit.data.demo import DemoSpec, generate_demo
    from embedkit.study.demodata import demo_dataset_config

    data = tmp_path / "data"
    generate_demo(data, DemoSpec(n_patients=2, images_per_patient=3, size=64))
    manifest = data / "manifest.yaml"
    doc = {"cache": "unused", "datasets": {"demo": demo_dataset_config()}}
    manifest.write_text(yaml.safe_dump(doc, sort_keys=False))
    uri = s3_server.new_uri()
    env = {
        "PATH": "/usr/bin:/bin",
        "HOME": str(tmp_path),
        "XDG_CACHE_HOME": str(tmp_path / "xdg"),
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "COLUMNS": "200",
        **s3_server.env,
    }
    cmd = [sys.executable, "-m", "embedkit"]
    extract = [
        *cmd, "extract", "--model", "test/tiny-vit", "--dataset", "demo", "--resolution", "64",
        "--unit-rows", "4", "--workers", "0", "--device", "cpu",
        "--manifest", str(manifest), "--cache", uri,
    ]  # fmt: skip
    done = subprocess.run(extract, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    verify = [*cmd, "cache", "verify", "--cache", uri]
    checked = subprocess.run(verify, env=env, capture_output=True, text=True, timeout=300)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "1 ok, 0 with problems" in checked.stdout
    root = CacheRoot.from_uri(uri)
    (summary,) = list_entries(root)
    assert (summary.complete, summary.n_images) == (True, 6)
    entry = FeatureEntry.open(root, summary.relpath)
    assert np.isfinite(entry.read(entry.poolings[0]).astype(np.float32)).all()
