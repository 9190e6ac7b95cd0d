from __future__ import annotations

import os
from pathlib import Path

import pytest

from embedkit.errors import CacheWriteError
from embedkit.store import CacheRoot
from embedkit.store.backend import FsspecBackend


def test_size_of_a_tree_whose_files_come_and_go(
    root: CacheRoot, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`cache ls` sums sizes while live writers create and delete claims: an object listed and
    gone before its size is asked for must not fail the listing."""
    root.write_bytes_atomic("e/units/000000.json", b"12345")
    root.write_bytes_atomic("e/leases/.probe-x", b"1")
    if isinstance(root.backend, FsspecBackend):
        fs = root.backend.fs
        real_info = fs._info if hasattr(fs, "_info") else None

        async def vanished(path: str, *a: object, **kw: object) -> object:
            if ".probe-" in path:
                raise FileNotFoundError(path)
            assert real_info is not None
            return await real_info(path, *a, **kw)

        if real_info is not None and fs.async_impl:
            monkeypatch.setattr(fs, "_info", vanished)
    assert root.size_bytes("e") == 6
    assert root.size_bytes("missing") == 0


def test_bytes_listing_and_removal(root: CacheRoot) -> None:
    root.write_bytes_atomic("a/b/one.json", b"1")
    root.write_bytes_atomic("a/b/one.json", b"22")  # replace
    root.write_bytes_atomic("a/c/two.json", b"3")
    assert root.read_bytes("a/b/one.json") == b"22"
    assert root.exists("a/b")
    assert not root.exists("a/zz")
    assert root.listdir("a") == ["b", "c"]
    assert root.listdir("missing") == []
    assert root.glob("*/*/*.json") == ["a/b/one.json", "a/c/two.json"]
    assert root.size_bytes("a") == 3
    with pytest.raises(FileNotFoundError):
        root.read_bytes("a/nope.json")
    root.remove_tree("a/b")
    assert root.glob("*/*/*.json") == ["a/c/two.json"]
    with pytest.raises(ValueError, match="whole cache root"):
        root.remove_tree("")
    if root.is_local:
        assert not [p for p in os.listdir(root.url("a/c")) if p.endswith(".tmp")]


def test_local_root_created(tmp_path: Path) -> None:
    root = CacheRoot.from_uri(tmp_path / "x" / "y")
    assert root.is_local
    assert (tmp_path / "x" / "y").is_dir()
    assert CacheRoot.from_uri(f"file://{tmp_path}/x/y").local_path == root.local_path
    assert not CacheRoot.from_uri("memory://somewhere").is_local


def test_root_under_a_file_is_rejected(tmp_path: Path) -> None:
    blocker = tmp_path / "plain-file"
    blocker.write_text("not a directory")
    with pytest.raises(CacheWriteError, match=r"plain-file/cache.*Choose another --cache"):
        CacheRoot.from_uri(blocker / "cache")
    with pytest.raises(CacheWriteError, match="not a directory"):
        CacheRoot.from_uri(blocker)


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_read_only_root_opens_for_reading_and_refuses_writes(tmp_path: Path) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        root = CacheRoot.from_uri(ro)  # listing and reading must work for read-only users
        assert root.writable is False
        with pytest.raises(CacheWriteError, match="read access only"):
            root.require_writable()
    finally:
        ro.chmod(0o755)


def test_atomic_writes_are_readable_by_other_users_of_a_shared_root(tmp_path: Path) -> None:
    """Records and COMPLETE.json get the mode of a plain open() (umask), not mkstemp's 0600."""
    import stat

    root = CacheRoot.from_uri(tmp_path / "shared")
    root.write_bytes_atomic("e/units/000000.json", b"{}")
    (tmp_path / "plain.json").write_bytes(b"{}")
    mode = stat.S_IMODE((tmp_path / "shared" / "e/units/000000.json").stat().st_mode)
    assert mode == stat.S_IMODE((tmp_path / "plain.json").stat().st_mode)
