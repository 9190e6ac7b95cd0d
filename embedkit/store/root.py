"""Cache roots: a local directory or an fsspec URL, behind one small backend-neutral interface.

Paths given to the methods are relative to the root and use ``/`` separators.
"""

from __future__ import annotations

import fnmatch
import os
import shutil
import tempfile
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import fsspec
from zarr.abc.store import Store
from zarr.storage import FsspecStore, LocalStore

from embedkit.errors import CacheWriteError

__all__ = ["CacheRoot"]


def _join(*parts: str) -> str:
    return "/".join(p.strip("/") for p in parts if p.strip("/"))


@dataclass(frozen=True)
class CacheRoot:
    """Where cache entries live. Build it with :meth:`from_uri`."""

    uri: str
    local_path: Path | None = None
    storage_options: Mapping[str, Any] = field(default_factory=dict)
    _fs: Any = field(default=None, repr=False, compare=False)
    _base: str = field(default="", repr=False, compare=False)

    @classmethod
    def from_uri(
        cls, uri: str | Path, *, storage_options: Mapping[str, Any] | None = None
    ) -> CacheRoot:
        """Open (and for local paths create) a cache root.

        ``uri`` is a local path, a ``file://`` URL, or any fsspec URL (``memory://``,
        ``s3://bucket/prefix``, ``gs://...``); ``storage_options`` go to the fsspec filesystem.
        A local root that cannot be created or written raises :class:`CacheWriteError`.
        """
        options = dict(storage_options or {})
        text = str(uri)
        if isinstance(uri, Path) or "://" not in text or text.startswith("file://"):
            path = Path(text.removeprefix("file://")).expanduser().resolve()
            _ensure_writable(path)
            return cls(uri=str(path), local_path=path, storage_options=options)
        fs, base = fsspec.core.url_to_fs(text, **options)
        base = base.rstrip("/")
        try:
            fs.makedirs(base, exist_ok=True)
        except OSError as exc:
            raise CacheWriteError(
                f"Cannot create the cache root {text}: {exc}. Check the credentials and the "
                "bucket, or choose another --cache."
            ) from exc
        return cls(uri=text.rstrip("/"), storage_options=options, _fs=fs, _base=base)

    @property
    def is_local(self) -> bool:
        """True for a directory on a (possibly shared) local filesystem."""
        return self.local_path is not None

    def url(self, relpath: str = "") -> str:
        """Absolute path (local) or URL (remote) of ``relpath``."""
        if self.local_path is not None:
            return str(self.local_path / relpath) if relpath else str(self.local_path)
        return f"{self.uri}/{relpath.strip('/')}" if relpath else self.uri

    def _fspath(self, relpath: str) -> str:
        return _join(self._base, relpath) if self._base else relpath.strip("/")

    def _fsabs(self, relpath: str) -> str:
        # fsspec memory paths are absolute ("/bucket/x"); keep what url_to_fs gave us.
        p = self._fspath(relpath)
        return "/" + p if self._base.startswith("/") and not p.startswith("/") else p

    def zarr_store(self, relpath: str, *, read_only: bool = False) -> Store:
        """A zarr store rooted at ``relpath`` (LocalStore locally, FsspecStore otherwise)."""
        if self.local_path is not None:
            return LocalStore(self.local_path / relpath, read_only=read_only)
        return FsspecStore.from_url(
            self.url(relpath), storage_options=dict(self.storage_options), read_only=read_only
        )

    def write_bytes_atomic(self, relpath: str, data: bytes) -> None:
        """Write ``data`` so that readers see either nothing or all of it.

        Local: a temporary file in the same directory, fsync, then ``os.replace``. Object
        stores: a single PUT, which is atomic.
        """
        if self.local_path is None:
            self._fs.pipe_file(self._fsabs(relpath), data)
            return
        target = self.local_path / relpath
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def read_bytes(self, relpath: str) -> bytes:
        """The bytes of ``relpath``; a missing file raises :class:`FileNotFoundError`."""
        if self.local_path is not None:
            return (self.local_path / relpath).read_bytes()
        data = self._fs.cat_file(self._fsabs(relpath))
        return bytes(data)

    def exists(self, relpath: str) -> bool:
        """Whether ``relpath`` (file or directory) exists."""
        if self.local_path is not None:
            return (self.local_path / relpath).exists()
        return bool(self._fs.exists(self._fsabs(relpath)))

    def listdir(self, relpath: str = "") -> list[str]:
        """Sorted names (not paths) directly under ``relpath``; empty if it does not exist."""
        if self.local_path is not None:
            d = self.local_path / relpath
            return sorted(os.listdir(d)) if d.is_dir() else []
        try:
            entries = self._fs.ls(self._fsabs(relpath), detail=False)
        except FileNotFoundError:
            return []
        return sorted({str(e).rstrip("/").rsplit("/", 1)[-1] for e in entries})

    def glob(self, pattern: str) -> list[str]:
        """Sorted relative paths matching a ``/``-separated glob such as ``*/*/*.zarr``."""
        parts = [p for p in pattern.split("/") if p]
        found = [""]
        for part in parts:
            found = [
                _join(prefix, name)
                for prefix in found
                for name in self.listdir(prefix)
                if fnmatch.fnmatchcase(name, part)
            ]
        return sorted(found)

    def size_bytes(self, relpath: str) -> int:
        """Total size of the files under ``relpath`` (bytes on disk, not counting blocks)."""
        if self.local_path is not None:
            total = 0
            for dirpath, _, files in os.walk(self.local_path / relpath):
                for name in files:
                    try:
                        total += os.path.getsize(os.path.join(dirpath, name))
                    except FileNotFoundError:
                        continue
            return total
        sizes = self._fs.du(self._fsabs(relpath), total=True)
        return int(sizes)

    def remove_tree(self, relpath: str) -> None:
        """Delete ``relpath`` and everything under it; missing is not an error."""
        if not relpath.strip("/"):
            raise ValueError("Refusing to remove the whole cache root.")
        if self.local_path is not None:
            target = self.local_path / relpath
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
            return
        path = self._fsabs(relpath)
        if self._fs.exists(path):
            self._fs.rm(path, recursive=True)


def _ensure_writable(path: Path) -> None:
    hint = "Choose another --cache (a directory you can write to)."
    if path.exists() and not path.is_dir():
        raise CacheWriteError(f"The cache root {path} exists but is not a directory. {hint}")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CacheWriteError(f"Cannot create the cache root {path}: {exc}. {hint}") from exc
    probe = path / f".embedkit-write-test-{uuid.uuid4().hex}"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise CacheWriteError(f"The cache root {path} is not writable: {exc}. {hint}") from exc
