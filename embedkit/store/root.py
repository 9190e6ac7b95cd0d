"""Cache roots: a local directory or an fsspec URL, behind one small backend-neutral interface.

Paths given to the methods are relative to the root and use ``/`` separators. The storage
itself is a :class:`embedkit.store.backend.Backend` chosen by the URL's scheme; this class adds
what every backend shares: read-only roots, error messages that name the fix, globbing and
usage marks.

Credentials for remote roots come from the usual configuration of the fsspec backend (for S3:
``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` / ``AWS_ENDPOINT_URL`` / profiles, or
``FSSPEC_S3_*`` variables) or from ``storage_options``; they live only in this in-memory object
and are never written into an entry.

A root you cannot write (read-only credentials or permissions) still opens: listing and
reading work, and every write raises :class:`CacheWriteError` naming the root and the fix.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fnmatch
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from zarr.abc.store import Store

from embedkit.errors import CacheWriteError, IntegrityError
from embedkit.store.backend import Backend, ExclusiveCreate, ObjectStat, join, open_backend

__all__ = ["CacheRoot", "ObjectStat", "check_object_path"]


def check_object_path(where: str, path: str) -> str:
    """``path`` if it is a plain relative key inside an entry, else :class:`IntegrityError`.

    Refused: empty or absolute keys, ``.`` / ``..`` / empty segments, backslashes (Windows
    separators), NUL and drive letters: a key that could name a file outside the entry once
    joined to a local path. ``where`` (the entry's URL) is named in the error.
    """
    parts = path.split("/")
    bad = (
        not path
        or path.startswith("/")
        or "\\" in path
        or "\0" in path
        or (len(path) > 1 and path[1] == ":")
        or any(p in ("", ".", "..") for p in parts)
    )
    if bad:
        raise IntegrityError(
            f"Refusing the object key {path!r} in {where}: keys must be relative paths inside "
            "the entry (no '..', no absolute path, no backslash). The entry was tampered with "
            "or written by another tool; remove that object or the entry."
        )
    return path


@dataclass(frozen=True)
class CacheRoot:
    """Where cache entries live. Build it with :meth:`from_uri`."""

    uri: str
    backend: Backend = field(repr=False, compare=False)
    storage_options: Mapping[str, Any] = field(default_factory=dict)
    #: False when the root is known to be read-only for us (every write then raises).
    writable: bool = field(default=True, compare=False)

    @classmethod
    def from_uri(
        cls, uri: str | Path, *, storage_options: Mapping[str, Any] | None = None
    ) -> CacheRoot:
        """Open (and for local paths create) a cache root.

        ``uri`` is a local path, a ``file://`` URL, or any fsspec URL (``memory://``,
        ``s3://bucket/prefix``, ``gs://...``); ``storage_options`` go to the fsspec filesystem.
        The backend comes from the scheme (:data:`embedkit.store.backend.BACKENDS`). A local
        root that cannot be created raises :class:`CacheWriteError`; an existing root we may
        not write opens read-only (``writable`` is False).
        """
        options = dict(storage_options or {})
        backend = open_backend(uri, options)
        return cls(
            uri=backend.uri, backend=backend, storage_options=options, writable=backend.writable
        )

    @property
    def local_path(self) -> Path | None:
        """The root's directory on a (possibly shared) local filesystem, or None."""
        return self.backend.local_path

    def require_writable(self, what: str = "write to") -> None:
        """Raise :class:`CacheWriteError` if this root is known to be read-only."""
        if not self.writable:
            raise self.write_error(what, PermissionError("the root is read-only for this user"))

    def write_error(self, what: str, exc: BaseException) -> CacheWriteError:
        """The error for a failed write: names the root, the cause and the fix."""
        if isinstance(exc, PermissionError):
            fix = (
                "You have read access only: listing and reading work, writing does not. Use "
                "credentials or an account with write access to this root"
                + self.backend.permission_hint
                + ", or choose another --cache you can write to."
            )
            return CacheWriteError(f"Cannot {what} {self.url()}: permission denied ({exc}). {fix}")
        return CacheWriteError(
            f"Cannot {what} {self.url()}: {exc}. Check permissions and free space, or choose "
            "another --cache."
        )

    @property
    def is_local(self) -> bool:
        """True for a directory on a (possibly shared) local filesystem."""
        return self.local_path is not None

    def url(self, relpath: str = "") -> str:
        """Absolute path (local) or URL (remote) of ``relpath``."""
        return self.backend.url(relpath)

    def zarr_store(self, relpath: str, *, read_only: bool = False) -> Store:
        """A zarr store rooted at ``relpath`` (LocalStore locally, FsspecStore otherwise)."""
        return self.backend.zarr_store(relpath, read_only=read_only)

    def lock(self, relpath: str) -> contextlib.AbstractContextManager[Any]:
        """A lock file beside ``relpath`` on local roots (``<relpath>.lock``: re-entrant in this
        process, exclusive across processes); a no-op on object stores, whose writers
        coordinate with leases."""
        return self.backend.lock(relpath)

    def write_bytes_atomic(self, relpath: str, data: bytes, *, durable: bool = True) -> None:
        """Write ``data`` so that readers see either nothing or all of it.

        Local: a temporary file in the same directory, fsync (skipped with ``durable=False``:
        then atomic for other processes but not across a power loss), then ``os.replace``.
        Object stores: a single PUT, which is atomic. Failures raise :class:`CacheWriteError`.
        """
        self.require_writable()
        try:
            self.backend.write_atomic(relpath, data, durable=durable)
        except OSError as exc:
            raise self.write_error(f"write {relpath} in", exc) from exc

    def create_exclusive(self, relpath: str, data: bytes, *, durable: bool = True) -> bool:
        """Create ``relpath`` holding ``data`` only if it does not exist; whether we created it.

        Readers see nothing or all of ``data``, and of several processes racing to create the
        same path exactly one gets True, wherever :attr:`exclusive_create` is ``"atomic"``
        (local and shared filesystems: a hard link of a complete temporary file; S3: a PUT
        with ``If-None-Match: *``; memory://: a check-and-write under a process lock; see the
        backends in :mod:`embedkit.store.backend`).
        """
        self.require_writable()
        try:
            return self.backend.create_exclusive(relpath, data, durable=durable)
        except OSError as exc:
            raise self.write_error(f"create {relpath} in", exc) from exc

    @property
    def exclusive_create(self) -> ExclusiveCreate:
        """``"atomic"`` or ``"best-effort"``: the guarantee of :meth:`create_exclusive`."""
        return self.backend.exclusive_create

    def read_bytes(self, relpath: str) -> bytes:
        """The bytes of ``relpath``; a missing file raises :class:`FileNotFoundError`."""
        return self.backend.read(relpath)

    def read_range(self, relpath: str, start: int, stop: int | None = None) -> bytes:
        """Bytes ``[start, stop)`` of ``relpath`` (to its end when ``stop`` is None)."""
        return self.backend.read_range(relpath, start, stop)

    def stat(self, relpath: str) -> ObjectStat | None:
        """Size and mtime of the file ``relpath``, or None if it does not exist."""
        return self.backend.stat(relpath)

    def files(self, relpath: str) -> dict[str, ObjectStat]:
        """Every file under ``relpath`` (paths relative to ``relpath``), with size and mtime.

        Temporary files of interrupted atomic writes are left out.
        """
        return self.backend.files(relpath)

    def entry_files(self, relpath: str) -> dict[str, ObjectStat]:
        """:meth:`files` of an entry, every key checked by :func:`check_object_path` (for
        copies, read-through caches and gc: nothing they do may leave the entry)."""
        found = self.files(relpath)
        for path in found:
            check_object_path(self.url(relpath), path)
        return found

    def list_files(self, relpath: str = "") -> dict[str, ObjectStat]:
        """Files directly under ``relpath`` (names, not paths) with size and mtime: one listing
        request on object stores. Empty if ``relpath`` does not exist."""
        return self.backend.list_files(relpath)

    def touch(self, relpath: str, *, min_interval_s: float) -> bool:
        """Write a small timestamp object at ``relpath`` unless one is younger than the interval.

        Best effort (for "last used" marks): a read-only root is left alone. Returns whether it
        wrote.
        """
        if not self.writable:
            return False
        now = _dt.datetime.now(_dt.UTC)
        try:
            st = self.stat(relpath)
            mtime = st.mtime if st is not None else None
            if mtime is not None and (now - mtime).total_seconds() < min_interval_s:
                return False
            body = json.dumps({"last_used": now.isoformat(timespec="seconds")}).encode()
            self.write_bytes_atomic(relpath, body)
        except OSError:  # CacheWriteError included: usage marks never fail a read
            return False
        return True

    def exists(self, relpath: str) -> bool:
        """Whether ``relpath`` (file or directory) exists."""
        return self.backend.exists(relpath)

    def read_small(self, relpath: str) -> bytes:
        """:meth:`read_bytes` for small, non-empty files (claims, records) in one request.

        On S3 a plain read costs a HEAD (for the size) and a GET; this sends one ranged GET.
        """
        return self.backend.read_range(relpath, 0)

    def is_file(self, relpath: str) -> bool:
        """Whether the small, non-empty file ``relpath`` exists, in one request (on S3,
        :meth:`exists` of a missing key costs a HEAD and a LIST)."""
        return self.backend.is_file(relpath)

    def listdir(self, relpath: str = "") -> list[str]:
        """Sorted names (not paths) directly under ``relpath``; empty if it does not exist."""
        return self.backend.listdir(relpath)

    def glob(self, pattern: str) -> list[str]:
        """Sorted relative paths matching a ``/``-separated glob such as ``*/*/*.zarr``."""
        parts = [p for p in pattern.split("/") if p]
        found = [""]
        for part in parts:
            found = [
                join(prefix, name)
                for prefix in found
                for name in self.listdir(prefix)
                if fnmatch.fnmatchcase(name, part)
            ]
        return sorted(found)

    def size_bytes(self, relpath: str) -> int:
        """Total size of the files under ``relpath`` (bytes on disk, not counting blocks)."""
        return self.backend.size_bytes(relpath)

    def remove_tree(self, relpath: str) -> None:
        """Delete ``relpath`` and everything under it; missing is not an error."""
        if not relpath.strip("/"):
            raise ValueError("Refusing to remove the whole cache root.")
        self.require_writable(f"remove {relpath} from")
        try:
            self.backend.delete(relpath)
        except OSError as exc:
            raise self.write_error(f"remove {relpath} from", exc) from exc
