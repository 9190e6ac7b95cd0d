"""Cache roots: a local directory or an fsspec URL, behind one small backend-neutral interface.

Paths given to the methods are relative to the root and use ``/`` separators.

Credentials for remote roots come from the usual configuration of the fsspec backend (for S3:
``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` / ``AWS_ENDPOINT_URL`` / profiles, or
``FSSPEC_S3_*`` variables) or from ``storage_options``; they live only in this in-memory object
and are never written into an entry.

A root you cannot write (read-only credentials or permissions) still opens: listing and
reading work, and every write raises :class:`CacheWriteError` naming the root and the fix.
"""

from __future__ import annotations

import datetime as _dt
import errno
import fnmatch
import json
import os
import shutil
import tempfile
import threading
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import fsspec
from zarr.abc.store import Store
from zarr.storage import FsspecStore, LocalStore

from embedkit.errors import CacheWriteError

__all__ = ["CacheRoot", "ObjectStat"]

#: fsspec protocols whose ``pipe_file(mode="create")`` is an atomic create-if-absent: S3 sends
#: ``If-None-Match: *`` (the store must honour it; see ``CacheRoot.exclusive_create``) and the
#: in-process memory filesystem is guarded by :data:`_MEMORY_CREATE` below.
_ATOMIC_CREATE = {"s3", "s3a", "memory"}
_MEMORY_CREATE = threading.Lock()

#: Remote filesystems are opened without listing caches: other processes and zarr's own
#: filesystem instance write to the same prefix, and a stale listing would hide their objects.
_REMOTE_DEFAULTS: dict[str, Any] = {"use_listings_cache": False}
#: The process umask (read once at import: os.umask can only be read by setting it).
_UMASK = os.umask(0o022)
os.umask(_UMASK)


class ObjectStat(NamedTuple):
    """Size and modification time (UTC) of one file or object (and its ETag on S3)."""

    size: int
    mtime: _dt.datetime | None
    etag: str | None = None


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
    #: False when the root is known to be read-only for us (every write then raises).
    writable: bool = field(default=True, compare=False)

    @classmethod
    def from_uri(
        cls, uri: str | Path, *, storage_options: Mapping[str, Any] | None = None
    ) -> CacheRoot:
        """Open (and for local paths create) a cache root.

        ``uri`` is a local path, a ``file://`` URL, or any fsspec URL (``memory://``,
        ``s3://bucket/prefix``, ``gs://...``); ``storage_options`` go to the fsspec filesystem.
        A local root that cannot be created raises :class:`CacheWriteError`; an existing root
        we may not write opens read-only (``writable`` is False).
        """
        options = dict(storage_options or {})
        text = str(uri)
        if isinstance(uri, Path) or "://" not in text or text.startswith("file://"):
            path = Path(text.removeprefix("file://")).expanduser().resolve()
            writable = _ensure_writable(path)
            return cls(uri=str(path), local_path=path, storage_options=options, writable=writable)
        fs, base = fsspec.core.url_to_fs(text, **{**_REMOTE_DEFAULTS, **options})
        base = base.rstrip("/")
        writable = True
        try:
            fs.makedirs(base, exist_ok=True)
        except PermissionError:
            writable = False  # e.g. read-only credentials on a bucket: reading still works
        except OSError as exc:
            raise CacheWriteError(
                f"Cannot create the cache root {text}: {exc}. Check the credentials and the "
                "bucket, or choose another --cache."
            ) from exc
        return cls(
            uri=text.rstrip("/"), storage_options=options, _fs=fs, _base=base, writable=writable
        )

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
                + ("" if self.is_local else " (e.g. s3:PutObject and s3:DeleteObject on it)")
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
            self.url(relpath),
            storage_options={**_REMOTE_DEFAULTS, **self.storage_options},
            read_only=read_only,
        )

    def write_bytes_atomic(self, relpath: str, data: bytes, *, durable: bool = True) -> None:
        """Write ``data`` so that readers see either nothing or all of it.

        Local: a temporary file in the same directory, fsync (skipped with ``durable=False``:
        then atomic for other processes but not across a power loss), then ``os.replace``.
        Object stores: a single PUT, which is atomic. Failures raise :class:`CacheWriteError`.
        """
        self.require_writable()
        try:
            self._write_bytes_atomic(relpath, data, durable)
        except OSError as exc:
            raise self.write_error(f"write {relpath} in", exc) from exc

    def _write_bytes_atomic(self, relpath: str, data: bytes, durable: bool = True) -> None:
        if self.local_path is None:
            self._fs.pipe_file(self._fsabs(relpath), data)
            return
        target = self.local_path / relpath
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        try:
            # mkstemp makes the file private (0600); give it the mode of a plain open() so that
            # the other users of a shared root can read records and COMPLETE.json
            os.fchmod(fd, 0o666 & ~_UMASK)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                if durable:
                    os.fsync(f.fileno())
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def create_exclusive(self, relpath: str, data: bytes, *, durable: bool = True) -> bool:
        """Create ``relpath`` holding ``data`` only if it does not exist; whether we created it.

        Readers see nothing or all of ``data``, and of several processes racing to create the
        same path exactly one gets True, wherever :attr:`exclusive_create` is ``"atomic"``:

        * local / shared filesystems: the data go to a temporary file (fsynced unless
          ``durable=False``), then hard-linked to the target. ``link`` fails if the target
          exists, is atomic on local filesystems and NFS (the classic NFS-safe lock recipe: a
          lost reply is detected by the temporary file's link count), and publishes the
          complete content at once. Where hard links are not supported, ``O_CREAT | O_EXCL``
          (atomic, but the content follows).
        * S3: one ``PutObject`` with ``If-None-Match: *`` (s3fs ``pipe_file(mode="create")``);
          the store answers 412 to all but the first.
        * memory://: a check-and-write under a process-wide lock.
        * other fsspec stores: fsspec's ``pipe_file(mode="create")``, which for many backends
          is a check followed by a write (``exclusive_create`` is then ``"best-effort"``).
        """
        self.require_writable()
        try:
            return self._create_exclusive(relpath, data, durable)
        except OSError as exc:
            raise self.write_error(f"create {relpath} in", exc) from exc

    @property
    def exclusive_create(self) -> str:
        """``"atomic"`` or ``"best-effort"``: the guarantee of :meth:`create_exclusive`."""
        if self.local_path is not None:
            return "atomic"
        protocol = self._fs.protocol
        names = {protocol} if isinstance(protocol, str) else set(protocol)
        return "atomic" if names & _ATOMIC_CREATE else "best-effort"

    def _create_exclusive(self, relpath: str, data: bytes, durable: bool = True) -> bool:
        if self.local_path is None:
            path = self._fsabs(relpath)
            try:
                if "memory" in self._fs.protocol:
                    with _MEMORY_CREATE:
                        self._fs.pipe_file(path, data, mode="create")
                else:
                    self._fs.pipe_file(path, data, mode="create")
            except FileExistsError:
                return False
            return True
        target = self.local_path / relpath
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        try:
            os.fchmod(fd, 0o666 & ~_UMASK)  # readable by the other users of a shared root
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                if durable:
                    os.fsync(f.fileno())
            try:
                os.link(tmp, target)
            except OSError as exc:
                if exc.errno in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
                    if not _create_marker(target.with_name(f".{target.name}.excl")):
                        return False
                    os.replace(tmp, target)  # the marker's creator alone publishes the content
                    return True
                if os.stat(tmp).st_nlink == 2:  # NFS: our link was made, its reply was lost
                    return True
                if isinstance(exc, FileExistsError):
                    return False
                raise
            return True
        finally:
            Path(tmp).unlink(missing_ok=True)

    def read_bytes(self, relpath: str) -> bytes:
        """The bytes of ``relpath``; a missing file raises :class:`FileNotFoundError`."""
        if self.local_path is not None:
            return (self.local_path / relpath).read_bytes()
        data = self._fs.cat_file(self._fsabs(relpath))
        return bytes(data)

    def stat(self, relpath: str) -> ObjectStat | None:
        """Size and mtime of the file ``relpath``, or None if it does not exist."""
        if self.local_path is not None:
            try:
                st = (self.local_path / relpath).stat()
            except FileNotFoundError:
                return None
            return ObjectStat(st.st_size, _dt.datetime.fromtimestamp(st.st_mtime, _dt.UTC))
        try:
            info = self._fs.info(self._fsabs(relpath))
        except FileNotFoundError:
            return None
        return _object_stat(info)

    def files(self, relpath: str) -> dict[str, ObjectStat]:
        """Every file under ``relpath`` (paths relative to ``relpath``), with size and mtime.

        Temporary files of interrupted atomic writes are left out.
        """
        out: dict[str, ObjectStat] = {}
        if self.local_path is not None:
            top = self.local_path / relpath
            for dirpath, _, names in os.walk(top):
                for name in names:
                    if name.endswith(".tmp") and name.startswith("."):
                        continue
                    full = Path(dirpath) / name
                    try:
                        st = full.stat()
                    except FileNotFoundError:
                        continue
                    out[full.relative_to(top).as_posix()] = ObjectStat(
                        st.st_size, _dt.datetime.fromtimestamp(st.st_mtime, _dt.UTC)
                    )
            return dict(sorted(out.items()))
        base = self._fsabs(relpath).rstrip("/")
        try:
            found = self._fs.find(base, detail=True)
        except FileNotFoundError:
            return {}
        for name, info in found.items():
            rel = str(name).lstrip("/").removeprefix(base.lstrip("/")).lstrip("/")
            if rel and info.get("type", "file") != "directory":
                out[rel] = _object_stat(info)
        return dict(sorted(out.items()))

    def list_files(self, relpath: str = "") -> dict[str, ObjectStat]:
        """Files directly under ``relpath`` (names, not paths) with size and mtime: one listing
        request on object stores. Empty if ``relpath`` does not exist."""
        if self.local_path is not None:
            out: dict[str, ObjectStat] = {}
            try:
                with os.scandir(self.local_path / relpath) as it:
                    for item in it:
                        try:
                            if item.is_file():
                                st = item.stat()
                                out[item.name] = ObjectStat(
                                    st.st_size,
                                    _dt.datetime.fromtimestamp(st.st_mtime, _dt.UTC),
                                )
                        except FileNotFoundError:
                            continue
            except (FileNotFoundError, NotADirectoryError):
                return {}
            return dict(sorted(out.items()))
        try:
            found = self._fs.ls(self._fsabs(relpath), detail=True)
        except FileNotFoundError:
            return {}
        return dict(
            sorted(
                (str(info["name"]).rstrip("/").rsplit("/", 1)[-1], _object_stat(info))
                for info in found
                if info.get("type", "file") != "directory"
            )
        )

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
        if self.local_path is not None:
            return (self.local_path / relpath).exists()
        return bool(self._fs.exists(self._fsabs(relpath)))

    def read_small(self, relpath: str) -> bytes:
        """:meth:`read_bytes` for small, non-empty files (claims, records) in one request.

        On S3 a plain read costs a HEAD (for the size) and a GET; this sends one ranged GET.
        """
        if self.local_path is not None:
            return self.read_bytes(relpath)
        return bytes(self._fs.cat_file(self._fsabs(relpath), start=0))

    def is_file(self, relpath: str) -> bool:
        """Whether the small, non-empty file ``relpath`` exists, in one request (on S3,
        :meth:`exists` of a missing key costs a HEAD and a LIST)."""
        if self.local_path is not None:
            return (self.local_path / relpath).is_file()
        try:
            self.read_small(relpath)
        except FileNotFoundError:
            return False
        except OSError:  # e.g. an empty object refuses the range: ask the slow way
            return self.exists(relpath)
        return True

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
        # One recursive listing, sizes taken from it: fsspec's du() HEADs every listed object
        # and fails on one deleted meanwhile (claims and probe objects of live writers come
        # and go while `cache ls` runs).
        try:
            found = self._fs.find(self._fsabs(relpath), detail=True)
        except FileNotFoundError:
            return 0
        return sum(int(info.get("size") or 0) for info in found.values())

    def remove_tree(self, relpath: str) -> None:
        """Delete ``relpath`` and everything under it; missing is not an error."""
        if not relpath.strip("/"):
            raise ValueError("Refusing to remove the whole cache root.")
        self.require_writable(f"remove {relpath} from")
        try:
            self._remove_tree(relpath)
        except OSError as exc:
            raise self.write_error(f"remove {relpath} from", exc) from exc

    def _remove_tree(self, relpath: str) -> None:
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


def _object_stat(info: Mapping[str, Any]) -> ObjectStat:
    """Size and mtime from an fsspec ``info`` dict (s3: LastModified, memory: created)."""
    raw = info.get("LastModified", info.get("mtime", info.get("created")))
    mtime: _dt.datetime | None = None
    if isinstance(raw, _dt.datetime):
        mtime = raw if raw.tzinfo else raw.replace(tzinfo=_dt.UTC)
    elif isinstance(raw, int | float):
        mtime = _dt.datetime.fromtimestamp(raw, _dt.UTC)
    elif isinstance(raw, str):
        mtime = _dt.datetime.fromisoformat(raw)
        mtime = mtime if mtime.tzinfo else mtime.replace(tzinfo=_dt.UTC)
    etag = info.get("ETag") or info.get("etag")
    return ObjectStat(int(info.get("size") or 0), mtime, str(etag).strip('"') if etag else None)


def _create_marker(path: Path) -> bool:
    """Create an empty ``path`` with ``O_CREAT | O_EXCL`` (filesystems without hard links)."""
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
    except FileExistsError:
        return False
    return True


def _ensure_writable(path: Path) -> bool:
    """Create ``path`` if needed; whether we may write there (False: open read-only)."""
    hint = "Choose another --cache (a directory you can write to)."
    if path.exists() and not path.is_dir():
        raise CacheWriteError(f"The cache root {path} exists but is not a directory. {hint}")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CacheWriteError(f"Cannot create the cache root {path}: {exc}. {hint}") from exc
    if not os.access(path, os.W_OK | os.X_OK):
        return False
    probe = path / f".embedkit-write-test-{uuid.uuid4().hex}"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except PermissionError:
        return False
    except OSError as exc:
        raise CacheWriteError(f"The cache root {path} is not writable: {exc}. {hint}") from exc
    return True
