"""The on-disk layout of one feature cache entry, shared by its writer, reader and verifier.

An entry is a plain Zarr v3 group that zarr-python, xarray and other Zarr readers open as they
are (see README, "Reading an entry without embedkit"). Layout inside ``<root>/<key.relpath()>``::

    zarr.json                 group attrs (key, provenance, unit_rows, n_units, poolings, ...)
                              and the consolidated metadata of the arrays below
    <pooling>                 (N, D) or (N, h, w, D); dimension names ("image", "feature") or
                              ("image", "row", "col", "feature"); uncompressed (default) or
                              zstd; each work unit a whole number of chunks (~16 MB raw, ~4 MB
                              zstd; units smaller than that are one chunk); no sharding
    image                     (N,) str: the image ids, the "image" coordinate
    valid                     (N,) bool, False for images skipped as unreadable
    image/embedkit/           embedkit's own records (RECORDS_DIR), inside the directory of an
                              array, where Zarr readers never look for nodes:
      units/<u:06d>.json      per-unit completion record, written atomically after its chunks
      leases/<name>.<gen>.json  claims of the jobs writing the entry (see embedkit.store.lease);
                              removed once the entry is complete
      COMPLETE.json           created last (exclusively) by finalize(); complete iff it exists
      last_used.json          touched by the first read of an entry object, at most once a day
                              (for ``embedkit cache gc --unused-since``); not part of the data

Code outside this module names these records only through the constants below
(:data:`COMPLETE_FILE`, :data:`UNITS_DIR`, :func:`unit_record_name`, ...), as paths relative to
the entry. Entries of layout 1 (before format version 2 of the key: ``features/<pooling>``,
``ids``, records beside the arrays) are not read; their keys differ, so extraction writes a new
entry beside them.

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
    "IMAGE_ARRAY",
    "IMAGE_DIM",
    "LAST_USED_FILE",
    "LAST_USED_INTERVAL_S",
    "LAYOUT_VERSION",
    "LEASES_DIR",
    "LEGACY_COMPLETE_FILE",
    "META_FILE",
    "PATCH_POOLING",
    "RECORDS_DIR",
    "RESERVED_NAMES",
    "RUNTIME_CONFIG",
    "UNITS_DIR",
    "VALID_ARRAY",
    "EntryLayout",
    "dimension_names",
    "entry_relpaths",
    "existing_attrs",
    "feature_array",
    "fmt_ids",
    "is_feature_array",
    "now_iso",
    "read_attrs",
    "record_unit",
    "resolve_entry",
    "unit_record_name",
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
#: 2: arrays at the group's root with dimension names, ids as the "image" coordinate,
#: records under RECORDS_DIR, consolidated metadata (1: ``features/<p>``, ``ids``, records
#: beside the arrays).
LAYOUT_VERSION = 2
#: The pooling holding the patch-token grid (always stored as float16).
PATCH_POOLING = "patch"
#: Zarr's metadata document of a group or array.
META_FILE = "zarr.json"
#: The image ids: a (N,) str array, the dimension coordinate of :data:`IMAGE_DIM`.
IMAGE_ARRAY = "image"
#: The first dimension of every array of an entry.
IMAGE_DIM = "image"
#: The (N,) bool array marking images skipped as unreadable (False).
VALID_ARRAY = "valid"
#: Names a pooling cannot take (they name the entry's other arrays).
RESERVED_NAMES = frozenset({IMAGE_ARRAY, VALID_ARRAY})
#: embedkit's records (entry-relative paths). They live inside the directory of an array:
#: Zarr readers list the members of groups, never the keys of an array beyond its chunks,
#: so zarr-python and xarray open an entry without warnings about objects they do not know.
RECORDS_DIR = f"{IMAGE_ARRAY}/embedkit"
#: Per-unit completion records: ``<UNITS_DIR>/<u:06d>.json`` (see :func:`unit_record_name`).
UNITS_DIR = f"{RECORDS_DIR}/units"
#: The entry's completion record, created last.
COMPLETE_FILE = f"{RECORDS_DIR}/COMPLETE.json"
#: Where layout 1 (an earlier embedkit) kept its completion record: beside the arrays. gc
#: counts such an entry complete, so its default rule never removes expensive old features.
LEGACY_COMPLETE_FILE = "COMPLETE.json"
#: Claims of the jobs writing the entry (see :mod:`embedkit.store.lease`).
LEASES_DIR = f"{RECORDS_DIR}/leases"
#: Usage mark of an entry (see the layout above) and how often readers refresh it.
LAST_USED_FILE = f"{RECORDS_DIR}/last_used.json"
LAST_USED_INTERVAL_S = 86400.0
#: How the entry's arrays are opened (and created): every chunk is written, even all zeros.
RUNTIME_CONFIG: ArrayConfigParams = {"write_empty_chunks": True}
_UNIT_FILE = re.compile(r"^(\d{6})\.json$")
_UNIT_RECORD = re.compile(rf"^{re.escape(UNITS_DIR)}/(\d{{6}})\.json$")


def feature_array(pooling: str) -> str:
    """The array (entry-relative path) holding the stored pooling ``pooling``."""
    return pooling


def is_feature_array(name: str) -> bool:
    """Whether the array ``name`` of an entry holds features (not the ids or the mask)."""
    return name not in RESERVED_NAMES


def unit_record_name(u: int) -> str:
    """Entry-relative path of unit ``u``'s completion record."""
    return f"{UNITS_DIR}/{u:06d}.json"


def record_unit(path: str) -> int | None:
    """The unit whose completion record the entry-relative ``path`` is, else None."""
    m = _UNIT_RECORD.match(path)
    return int(m.group(1)) if m else None


def dimension_names(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, tuple[str, ...]]:
    """The Zarr ``dimension_names`` of each pooling's array, given its per-image shape.

    ``(D,)`` is ``("image", "feature")`` and a patch grid ``(h, w, D)`` is ``("image", "row",
    "col", "feature")``; other ranks get ``axis1``, ``axis2``, ... A name is shared only by
    axes of one size (xarray requires it): where poolings disagree (say ``cls`` of 768 and
    ``mean`` of 1024), each gets its own, prefixed with the pooling (``cls_feature``).
    """

    def base(shape: tuple[int, ...]) -> tuple[str, ...]:
        if len(shape) == 1:
            return ("feature",)
        if len(shape) == 3:
            return ("row", "col", "feature")
        return tuple(f"axis{i + 1}" for i in range(len(shape)))

    sizes: dict[str, set[int]] = {}
    for shape in shapes.values():
        for name, size in zip(base(shape), shape, strict=True):
            sizes.setdefault(name, set()).add(int(size))
    return {
        p: (IMAGE_DIM, *(n if len(sizes[n]) == 1 else f"{p}_{n}" for n in base(shape)))
        for p, shape in shapes.items()
    }


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
    return [p for p in root.glob("*/*/*.zarr") if root.exists(f"{p}/{META_FILE}")]


def read_attrs(root: CacheRoot, relpath: str) -> dict[str, Any]:
    """The group attrs of the entry at ``relpath``; a missing entry, or one of an earlier
    layout that this version does not read, raises CacheNotFoundError."""
    try:
        meta = json.loads(root.read_bytes(f"{relpath}/{META_FILE}"))
    except FileNotFoundError as exc:
        raise CacheNotFoundError(
            f"No cache entry at {root.url(relpath)}. List entries with `embedkit cache ls`."
        ) from exc
    attrs = meta.get("attributes", {})
    attrs = attrs if isinstance(attrs, dict) else {}
    _refuse_earlier_layout(root, relpath, attrs)
    return attrs


def _refuse_earlier_layout(root: CacheRoot, relpath: str, attrs: Mapping[str, Any]) -> None:
    """Raise CacheNotFoundError for an entry of an earlier layout (see the module docstring)."""
    version = attrs.get("layout_version")
    if isinstance(version, int) and version < LAYOUT_VERSION:
        raise CacheNotFoundError(
            f"The cache entry at {root.url(relpath)} has layout {version}, written by an "
            f"earlier embedkit; this version reads layout {LAYOUT_VERSION} only. Extract it "
            "again (`embedkit extract`: the new entry gets a new digest, beside the old one) "
            "and remove the old one (`embedkit cache gc` treats it as partial)."
        )


def existing_attrs(root: CacheRoot, relpath: str) -> dict[str, Any] | None:
    """Attrs of a fully laid-out entry, or None (missing, or creation was interrupted); an
    entry of an earlier layout raises CacheNotFoundError."""
    try:
        meta = json.loads(root.read_bytes(f"{relpath}/{META_FILE}"))
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    attrs = meta.get("attributes") or {}
    _refuse_earlier_layout(root, relpath, attrs)
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
            ids = np.asarray(self.array(IMAGE_ARRAY)[:]).tolist()
            self.cached_ids = tuple(str(x) for x in ids)
        return self.cached_ids

    def array(self, name: str) -> zarr.Array[Any]:
        """The zarr array ``name`` (:func:`feature_array` of a pooling, :data:`IMAGE_ARRAY`,
        :data:`VALID_ARRAY`), opened once."""
        arr = self._arrays.get(name)
        if arr is None:
            arr = zarr.open_array(self._store, path=name, config=RUNTIME_CONFIG)
            self._arrays[name] = arr
        return arr

    def feature(self, pooling: str) -> zarr.Array[Any]:
        return self.array(feature_array(pooling))

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
        return f"{self.relpath}/{unit_record_name(u)}"

    @property
    def complete_path(self) -> str:
        return f"{self.relpath}/{COMPLETE_FILE}"

    def done_units(self) -> set[int]:
        """Units whose completion record exists."""
        done = set()
        for name in self.root.listdir(f"{self.relpath}/{UNITS_DIR}"):
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
        """The completion record (:data:`COMPLETE_FILE`), or None while incomplete."""
        try:
            record: dict[str, Any] = json.loads(self.root.read_bytes(self.complete_path))
        except FileNotFoundError:
            return None
        return record
