"""The storage backend protocol, one suite for every backend (local dir, memory://, s3:// on
the moto server): each test takes ``backend``, the backend of the ``root`` fixture."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest

from embedkit.store import CacheRoot
from embedkit.store.backend import (
    BACKENDS,
    Backend,
    FsspecBackend,
    LocalBackend,
    backend_for,
    open_backend,
    register_backend,
    url_scheme,
)


@pytest.fixture
def backend(root: CacheRoot) -> Backend:
    return root.backend


def test_is_a_backend(backend: Backend) -> None:
    assert isinstance(backend, Backend)
    assert backend.exclusive_create == "atomic"  # all three kinds tested here are atomic
    assert backend.writable


def test_create_if_absent_is_exclusive(backend: Backend) -> None:
    assert backend.create_exclusive("d/claim.json", b"first")
    assert not backend.create_exclusive("d/claim.json", b"second")
    assert backend.read("d/claim.json") == b"first"  # the loser changed nothing


def test_create_if_absent_race_has_one_winner(backend: Backend) -> None:
    wins: list[int] = []
    start = threading.Barrier(6)

    def create(i: int) -> None:
        start.wait()
        if backend.create_exclusive("race/x.json", f"{i}".encode()):
            wins.append(i)

    threads = [threading.Thread(target=create, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(wins) == 1
    assert backend.read("race/x.json") == f"{wins[0]}".encode()


def test_atomic_write_creates_and_replaces(backend: Backend) -> None:
    backend.write_atomic("a/b/one.json", b"1")
    backend.write_atomic("a/b/one.json", b"22", durable=False)
    assert backend.read("a/b/one.json") == b"22"
    assert list(backend.files("a")) == ["b/one.json"]  # no temporary file left behind


def test_reads_and_ranges(backend: Backend) -> None:
    backend.write_atomic("r/data.bin", bytes(range(100)))
    assert backend.read("r/data.bin") == bytes(range(100))
    assert backend.read_range("r/data.bin", 10, 20) == bytes(range(10, 20))
    assert backend.read_range("r/data.bin", 95) == bytes(range(95, 100))
    assert backend.read_range("r/data.bin", 0) == bytes(range(100))
    with pytest.raises(FileNotFoundError):
        backend.read("r/missing.bin")
    with pytest.raises(FileNotFoundError):
        backend.read_range("r/missing.bin", 0)


def test_listing_with_sizes(backend: Backend) -> None:
    backend.write_atomic("l/x/one.json", b"1")
    backend.write_atomic("l/x/deep/two.json", b"22")
    backend.write_atomic("l/three.json", b"333")
    files = backend.files("l")
    assert list(files) == ["three.json", "x/deep/two.json", "x/one.json"]
    assert [st.size for st in files.values()] == [3, 2, 1]
    assert all(st.mtime is not None for st in files.values())
    assert list(backend.list_files("l")) == ["three.json"]
    assert backend.list_files("l")["three.json"].size == 3
    assert backend.listdir("l") == ["three.json", "x"]
    assert backend.size_bytes("l") == 6
    assert backend.files("nothing") == {} and backend.list_files("nothing") == {}
    assert backend.listdir("nothing") == [] and backend.size_bytes("nothing") == 0
    stat = backend.stat("l/three.json")
    assert stat is not None and stat.size == 3
    assert backend.stat("l/none.json") is None


def test_exists_is_file_and_delete(backend: Backend) -> None:
    backend.write_atomic("e/x/one.json", b"1")
    backend.write_atomic("e/two.json", b"2")
    assert backend.exists("e/x") and backend.exists("e/x/one.json")
    assert backend.is_file("e/two.json") and not backend.is_file("e/none.json")
    backend.delete("e/x")
    assert not backend.exists("e/x") and not backend.exists("e/x/one.json")
    backend.delete("e/two.json")
    assert not backend.exists("e/two.json")
    backend.delete("e/never-there")  # missing is not an error


def test_sync_and_lock(backend: Backend) -> None:
    backend.write_atomic("s/one.json", b"1", durable=False)
    backend.sync("s/one.json")  # fsync where it exists, else nothing to do
    backend.sync("s")
    assert backend.read("s/one.json") == b"1"
    with backend.lock("s/entry.zarr"), backend.lock("s/entry.zarr"):  # re-entrant
        pass


def test_urls(backend: Backend) -> None:
    assert backend.url("") == backend.uri
    assert backend.url("a/b.json").endswith("/a/b.json")
    assert backend.url("a/b.json").startswith(backend.uri)


def test_registry_by_scheme(tmp_path: Path) -> None:
    assert url_scheme(tmp_path) == url_scheme(str(tmp_path)) == "file"
    assert url_scheme("file:///x") == "file" and url_scheme("S3://b/p") == "s3"
    assert backend_for(tmp_path) is LocalBackend
    assert backend_for("memory://x") is FsspecBackend and backend_for("s3://b") is FsspecBackend
    assert backend_for("gs://b") is FsspecBackend
    assert backend_for("az://c/p") is FsspecBackend  # any other fsspec URL
    assert isinstance(open_backend(tmp_path / "c"), LocalBackend)
    with pytest.raises(ValueError, match="already registered for s3://"):
        register_backend("s3", LocalBackend)
    register_backend("s3", FsspecBackend)  # the same registration again is harmless


def test_a_new_backend_is_one_class_and_one_registration(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A scheme served by a backend class of its own (here: a local directory under another
    name) works for a whole cache root."""

    class Scratch(LocalBackend):
        @classmethod
        def open(cls, uri: str | Path, storage_options: Any) -> Scratch:
            path = tmp_path / str(uri).split("://", 1)[1]
            path.mkdir(parents=True, exist_ok=True)
            return cls(path)

    monkeypatch.setitem(BACKENDS, "scratch", Scratch)
    root = CacheRoot.from_uri("scratch://team/a")
    assert isinstance(root.backend, Scratch)
    root.write_bytes_atomic("x/y.json", b"{}")
    assert (tmp_path / "team" / "a" / "x" / "y.json").read_bytes() == b"{}"
    assert root.glob("*/*.json") == ["x/y.json"]
