"""The on-disk layout of one feature cache entry, shared by its writer, reader and verifier.

Layout inside ``<root>/<key.relpath()>``::

    zarr.json                 group attrs: key, provenance, unit_rows, n_units, poolings, ...
    features/<pooling>        (N, D) or (N, h, w, D); uncompressed (default) or zstd; each work
                              unit a whole number of chunks (~16 MB raw, ~4 MB zstd; units
                              smaller than that are one chunk); no sharding
    ids                       (N,) str
    valid                     (N,) bool, False for images skipped as unreadable
    units/<u:06d>.json        per-unit completion record, written atomically after its chunks
    leases/<name>.<gen>.json  claims of the jobs writing the entry (see embedkit.store.lease);
                              removed once the entry is complete
    COMPLETE.json             created last (exclusively) by finalize(); complete iff it exists
    last_used.json            touched by the first read of an entry object, at most once a day
                              (for ``embedkit cache gc --unused-since``); not part of the data

:class:`EntryLayout` holds the facts of one entry read from its attrs (key, units, poolings
and their shapes and dtypes), the paths of its records, and opens its arrays (zarr-python for
metadata, fsspec roots and row-index reads; :class:`embedkit.store.chunkio.ChunkLayout` for
the chunk files of local roots). The functions below find entries in a root.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import re
import socket
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Any

import numpy as np
import zarr
from zarr.core.array_spec import ArrayConfigParams

from embedkit.errors import CacheNotFoundError, IncompleteEntryError
from embedkit.store.chunkio import ChunkLayout
from embedkit.store.key import CacheKey
from embedkit.store.root import CacheRoot

__all__ = [
    "COMPLETE_FILE",
    "DERIVED_POOLINGS",
    "LAST_USED_FILE",
    "LAST_USED_INTERVAL_S",
    "LAYOUT_VERSION",
    "PATCH_POOLING",
    "RUNTIME_CONFIG",
    "EntryLayout",
    "entry_relpaths",
    "existing_attrs",
    "fmt_ids",
    "now_iso",
    "read_attrs",
    "resolve_entry",
    "writer_identity",
]

#: Derived poolings served by concatenating stored ones along the feature axis: the one
#: table of them (models and the CLI read it from ``embedkit.store.DERIVED_POOLINGS``).
DERIVED_POOLINGS: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {
        "cls+mean": ("cls", "mean"),
        "pooled+mean": ("pooled", "mean"),
    }
)
LAYOUT_VERSION = 1
#: The pooling holding the patch-token grid (always stored as float16).
PATCH_POOLING = "patch"
COMPLETE_FILE = "COMPLETE.json"
#: Usage mark of an entry (see the layout above) and how often readers refresh it.
LAST_USED_FILE = "last_used.json"
LAST_USED_INTERVAL_S = 86400.0
#: How the entry's arrays are opened (and created): every chunk is written, even all zeros.
RUNTIME_CONFIG: ArrayConfigParams = {"write_empty_chunks": True}
_UNIT_FILE = re.compile(r"^(\d{6})\.json$")


def now_iso() -> str:
    """The current UTC time as written into records."""
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


def writer_identity() -> dict[str, Any]:
    """Who writes a record: host and process."""
    return {"host": socket.gethostname(), "pid": os.getpid()}


def fmt_ids(ids: Sequence[str], limit: int = 10) -> str:
    """The first ``limit`` of ``ids`` for a message, and how many more there are."""
    shown = ", ".join(ids[:limit])
    return shown + (f", ... and {len(ids) - limit} more" if len(ids) > limit else "")


def entry_relpaths(root: CacheRoot) -> list[str]:
    """Relative paths of every entry directory under ``root`` (``<dataset>/<model>/<x>.zarr``)."""
    return [p for p in root.glob("*/*/*.zarr") if root.exists(f"{p}/zarr.json")]


def read_attrs(root: CacheRoot, relpath: str) -> dict[str, Any]:
    """The group attrs of the entry at ``relpath``; a missing entry raises CacheNotFoundError."""
    try:
        meta = json.loads(root.read_bytes(f"{relpath}/zarr.json"))
    except FileNotFoundError as exc:
        raise CacheNotFoundError(
            f"No cache entry at {root.url(relpath)}. List entries with `embedkit cache ls`."
        ) from exc
    attrs = meta.get("attributes", {})
    return attrs if isinstance(attrs, dict) else {}


def existing_attrs(root: CacheRoot, relpath: str) -> dict[str, Any] | None:
    """Attrs of a fully laid-out entry, or None (missing, or creation was interrupted)."""
    try:
        meta = json.loads(root.read_bytes(f"{relpath}/zarr.json"))
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    attrs = meta.get("attributes") or {}
    return attrs if attrs.get("layout_version") == LAYOUT_VERSION else None


def resolve_entry(root: CacheRoot, query: str | CacheKey) -> str:
    """Relative path of the entry named by a key, a relative path, or a digest (prefix >= 6)."""
    if isinstance(query, CacheKey):
        return query.relpath()
    q = query.strip().rstrip("/")
    if q.endswith(".zarr") or "/" in q:
        return q
    if not re.fullmatch(r"[0-9a-f]{6,64}", q):
        raise CacheNotFoundError(
            f"Expected a cache entry digest (at least 6 hex characters) or an entry path, "
            f"got {query!r} instead. List entries with `embedkit cache ls`."
        )
    matches = []
    for rp in entry_relpaths(root):
        short = rp.rsplit("-", 1)[-1].removesuffix(".zarr")
        if not short.startswith(q[:16]):
            continue
        if len(q) > 16 and not str(read_attrs(root, rp).get("digest", "")).startswith(q):
            continue
        matches.append(rp)
    if not matches:
        raise CacheNotFoundError(
            f"No cache entry under {root.url()} has a digest starting with {q!r}. "
            "List entries with `embedkit cache ls`."
        )
    if len(matches) > 1:
        raise CacheNotFoundError(
            f"The digest prefix {q!r} is ambiguous; it matches {len(matches)} entries:\n"
            + "\n".join(f"  {m}" for m in matches)
            + "\nGive more characters of the digest."
        )
    return matches[0]


class EntryLayout:
    """Where the parts of one entry live and what its attrs say about them."""

    def __init__(
        self, root: CacheRoot, relpath: str, attrs: Mapping[str, Any], *, writable: bool
    ) -> None:
        self.root = root
        self.relpath = relpath
        self.key = CacheKey.from_dict(attrs["key"])
        self.unit_rows = int(attrs["unit_rows"])
        self.n_units = int(attrs["n_units"])
        self.n_images = int(attrs["n_images"])
        self.attrs = dict(attrs)
        self.shapes: dict[str, tuple[int, ...]] = {
            name: tuple(spec["shape"][1:]) for name, spec in attrs["poolings"].items()
        }
        self.dtypes: dict[str, np.dtype[Any]] = {
            name: np.dtype(spec["dtype"]) for name, spec in attrs["poolings"].items()
        }
        self.writable = writable
        self._store = root.zarr_store(relpath, read_only=not writable)
        self._arrays: dict[str, zarr.Array[Any]] = {}
        self._chunk_layouts: dict[str, ChunkLayout | None] = {}
        #: The image ids, read once (a writer sets them from its arguments).
        self.cached_ids: tuple[str, ...] | None = None

    @property
    def uri(self) -> str:
        """Absolute path or URL of the entry."""
        return self.root.url(self.relpath)

    @property
    def ids(self) -> tuple[str, ...]:
        if self.cached_ids is None:
            self.cached_ids = tuple(str(x) for x in np.asarray(self.array("ids")[:]).tolist())
        return self.cached_ids

    def array(self, name: str) -> zarr.Array[Any]:
        """The zarr array ``name`` (``features/<pooling>``, ``ids``, ``valid``), opened once."""
        arr = self._arrays.get(name)
        if arr is None:
            arr = zarr.open_array(self._store, path=name, config=RUNTIME_CONFIG)
            self._arrays[name] = arr
        return arr

    def feature(self, pooling: str) -> zarr.Array[Any]:
        return self.array(f"features/{pooling}")

    def chunk_layout(self, name: str) -> ChunkLayout | None:
        """Direct chunk-file access to array ``name`` (local roots, supported codecs only)."""
        if name not in self._chunk_layouts:
            local = self.root.local_path
            self._chunk_layouts[name] = (
                None
                if local is None
                else ChunkLayout.of(self.array(name), local / self.relpath / name)
            )
        return self._chunk_layouts[name]

    def unit_bounds(self, u: int) -> tuple[int, int]:
        """Rows ``[start, stop)`` of unit ``u``."""
        if not 0 <= u < self.n_units:
            raise IndexError(f"Expected a unit in [0, {self.n_units}), got {u} instead.")
        start = u * self.unit_rows
        return start, min(start + self.unit_rows, self.n_images)

    def unit_path(self, u: int) -> str:
        """Root-relative path of unit ``u``'s completion record."""
        return f"{self.relpath}/units/{u:06d}.json"

    @property
    def complete_path(self) -> str:
        return f"{self.relpath}/{COMPLETE_FILE}"

    def done_units(self) -> set[int]:
        """Units whose completion record exists."""
        done = set()
        for name in self.root.listdir(f"{self.relpath}/units"):
            m = _UNIT_FILE.match(name)
            if m and int(m.group(1)) < self.n_units:
                done.add(int(m.group(1)))
        return done

    def unit_record(self, u: int) -> dict[str, Any]:
        """The completion record of unit ``u``."""
        self.unit_bounds(u)
        try:
            record: dict[str, Any] = json.loads(self.root.read_bytes(self.unit_path(u)))
        except FileNotFoundError as exc:
            raise IncompleteEntryError(f"Unit {u} of {self.uri} has not been written.") from exc
        return record

    @property
    def is_complete(self) -> bool:
        return self.root.exists(self.complete_path)

    def completion(self) -> dict[str, Any] | None:
        """The COMPLETE.json record, or None while incomplete."""
        try:
            record: dict[str, Any] = json.loads(self.root.read_bytes(self.complete_path))
        except FileNotFoundError:
            return None
        return record
