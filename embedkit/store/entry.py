"""One feature cache entry: a Zarr v3 group written unit by unit, resumable, verified.

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

Each work unit is a whole number of chunks of every array, so writers of different units never
touch the same object (zarr loses data when writers share a shard). Two jobs never compute the
same unit: each claims a unit before computing it (:class:`embedkit.store.lease.Leases`), on
every backend. The layout is created by one job under the ``layout`` claim.

On local roots the chunk files are written and full-range reads are served by
:mod:`embedkit.store.chunkio` (same Zarr v3 files, byte for byte, ~10x faster than zarr-python);
zarr-python handles metadata, fsspec roots and row-index reads.

Crash safety: a unit counts as written iff ``units/<u>.json`` exists. On local roots
``write_unit`` (``begin_unit`` + ``PendingUnit.commit``; with :data:`FSYNC`, the default)
fdatasyncs every chunk file of the unit and fsyncs the directories it added entries to, *then*
writes the record (temporary file, fsync, rename). So after a process crash, kernel crash or
power loss, a present record implies durable chunks matching its checksums; a unit without a
record is rewritten on resume. Object stores make a PUT durable before it returns, so the same
order holds there. With ``FSYNC = False`` the guarantee shrinks to process crashes (data in the
page cache survives; a power loss may leave a record whose chunks are lost or torn, which
``verify`` reports as a checksum mismatch).

Checksums in unit records are crc32c (``"checksum_algorithm": "crc32c"``, hardware-accelerated,
~25 GB/s per core) over the stored bytes of the unit's rows, computed chunk by chunk while the
chunks are written and joined (:mod:`embedkit.store.checks`); records without that field (older
entries) hold sha256 and are verified as such.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import operator
import os
import re
import socket
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import filelock
import google_crc32c
import numpy as np
import zarr
from zarr.codecs import ZstdCodec
from zarr.core.array_spec import ArrayConfigParams
from zarr.core.buffer.cpu import NDBuffer
from zarr.core.chunk_key_encodings import ChunkKeyEncodingParams

from embedkit.errors import (
    CacheNotFoundError,
    CacheWriteError,
    EntryExistsError,
    IncompleteEntryError,
    IntegrityError,
)
from embedkit.store.checks import Scan, any_nonfinite, crc32c_combine, nonfinite_rows, scan
from embedkit.store.chunkio import POOL, ChunkLayout, fsync_dirs
from embedkit.store.key import CacheKey, digest_ids
from embedkit.store.lease import LAYOUT, LEASES_DIR, Leases, live_claims, resolve_ttl
from embedkit.store.root import CacheRoot

__all__ = [
    "CHECKSUM_ALGORITHM",
    "COMPRESSIONS",
    "DERIVED_POOLINGS",
    "FSYNC",
    "LAST_USED_FILE",
    "ZSTD_LEVEL",
    "FeatureEntry",
    "PendingUnit",
    "entry_relpaths",
    "remove_entry",
    "resolve_entry",
]

#: Derived poolings served by concatenating stored ones along the feature axis.
DERIVED_POOLINGS: dict[str, tuple[str, ...]] = {
    "cls+mean": ("cls", "mean"),
    "pooled+mean": ("pooled", "mean"),
}
#: ``compression=`` choices for new entries; the first is the default. Chosen by measurement
#: (benchmarks/RESULTS.md, "Feature store"): zstd saves only 8% of float16 features (their
#: mantissa bits are noise; Blosc byte/bit shuffles with lz4, blosclz or zstd save 0-8%) and
#: decodes at ~1.5 GB/s per core (0.7-0.8 CPU-s per GB in the store, vs ~0.1 for a raw read),
#: so full reads of a zstd entry ran at 0.19x np.load vs 0.94x uncompressed, and writes cost
#: 3x the CPU. Features are written once and read by every probe: "none" is the default; "zstd"
#: is there for archives and slow links, where 8% matters more than read speed.
COMPRESSIONS = ("none", "zstd")
#: zstd level for new entries: level 1 saves ~8% on float16 features at ~0.8 GB/s per core;
#: higher levels save nothing more and are slower; levels < 1 store raw (see RESULTS.md).
ZSTD_LEVEL = 1
#: A unit is split into chunks of about this size (a whole number per unit), which the
#: 2-thread pool scans, compresses, writes and reads in parallel (one file per chunk). Raw:
#: measured on 32 MB units (bench_store.py), 8/16/32 MB chunks wrote at 0.63/0.74-0.93/0.66x
#: np.save (16 MB: one chunk per pool thread; smaller files cost per-file work); zstd: ~4 MB,
#: so both threads compress.
CHUNK_BYTES: dict[str, int] = {"none": 16 << 20, "zstd": 4 << 20}
LAYOUT_VERSION = 1
PATCH_POOLING = "patch"

#: Make each unit's chunk files durable (fdatasync) before its record is written, and the
#: record itself (fsync) before ``write_unit`` returns; see the module docstring. Costs disk
#: bandwidth and latency (see benchmarks/RESULTS.md); only scratch caches should turn it off.
FSYNC = True
#: Checksum of new unit records: crc32c when its C implementation is present, else sha256.
CHECKSUM_ALGORITHM = "crc32c" if google_crc32c.implementation == "c" else "sha256"

_RUNTIME_CONFIG: ArrayConfigParams = {"write_empty_chunks": True}
#: Chunk files ``c.<i>.0`` side by side in the array's directory (Zarr v3 "default" encoding
#: with the "." separator): a unit's chunks then add entries to one directory, the only one
#: to fsync, where "/" makes a directory per chunk (``c/<i>/0``), each to create and fsync.
#: Entries written with "/" read the same (the layout comes from the array metadata).
_CHUNK_KEYS: ChunkKeyEncodingParams = {"name": "default", "separator": "."}
_UNIT_FILE = re.compile(r"^(\d{6})\.json$")
#: Usage mark of an entry (see the layout above) and how often readers refresh it.
LAST_USED_FILE = "last_used.json"
LAST_USED_INTERVAL_S = 86400.0


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


def _writer() -> dict[str, Any]:
    return {"host": socket.gethostname(), "pid": os.getpid()}


def _checksum(a: np.ndarray, algorithm: str = CHECKSUM_ALGORITHM) -> str:
    """Hex digest of the C-order bytes of ``a``."""
    flat = np.ascontiguousarray(a).reshape(-1).view(np.uint8)
    if algorithm == "crc32c":
        return f"{google_crc32c.value(flat):08x}"
    if algorithm == "sha256":
        return hashlib.sha256(flat.data).hexdigest()
    raise IntegrityError(f"Unknown checksum algorithm {algorithm!r} in a unit record.")


def _any_nonfinite_parallel(a: np.ndarray) -> bool:
    """:func:`any_nonfinite` on two halves at once (numpy reductions release the GIL)."""
    if a.shape[0] < 2 or a.nbytes < 1 << 22:
        return any_nonfinite(a)
    half = a.shape[0] // 2
    other = POOL.submit(any_nonfinite, a[half:])
    return any_nonfinite(a[:half]) | other.result()


def _chunk_rows(unit_rows: int, row_nbytes: int, compression: str) -> int:
    """Rows per chunk: a divisor of the unit giving chunks of about ``CHUNK_BYTES[compression]``.

    Chunks never straddle units (writers of different units touch different files). A unit
    that has no divisor giving chunks of at least a quarter of the target stays one chunk.
    """
    target = CHUNK_BYTES[compression]
    want = -(-unit_rows * row_nbytes // target)  # chunks per unit at the target size
    for k in range(max(want, 1), unit_rows + 1):
        rows = unit_rows // k
        if 4 * rows * row_nbytes < target:
            break
        if unit_rows % k == 0:
            return rows
    return unit_rows


def _fmt_ids(ids: Sequence[str], limit: int = 10) -> str:
    shown = ", ".join(ids[:limit])
    return shown + (f", ... and {len(ids) - limit} more" if len(ids) > limit else "")


def entry_relpaths(root: CacheRoot) -> list[str]:
    """Relative paths of every entry directory under ``root`` (``<dataset>/<model>/<x>.zarr``)."""
    return [p for p in root.glob("*/*/*.zarr") if root.exists(f"{p}/zarr.json")]


def _read_attrs(root: CacheRoot, relpath: str) -> dict[str, Any]:
    try:
        meta = json.loads(root.read_bytes(f"{relpath}/zarr.json"))
    except FileNotFoundError as exc:
        raise CacheNotFoundError(
            f"No cache entry at {root.url(relpath)}. List entries with `embedkit cache ls`."
        ) from exc
    attrs = meta.get("attributes", {})
    return attrs if isinstance(attrs, dict) else {}


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
        if len(q) > 16 and not str(_read_attrs(root, rp).get("digest", "")).startswith(q):
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


class FeatureEntry:
    """A feature cache entry. Build it with :meth:`create_or_open` (writers) or :meth:`open`."""

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
        self._writable = writable
        self._store = root.zarr_store(relpath, read_only=not writable)
        self._arrays: dict[str, zarr.Array] = {}
        self._layouts: dict[str, ChunkLayout | None] = {}
        self._ids: tuple[str, ...] | None = None
        self._row_of: dict[str, int] | None = None
        self._use_noted = False

    # ---- construction -------------------------------------------------------------------

    @classmethod
    def create_or_open(
        cls,
        root: CacheRoot,
        key: CacheKey,
        *,
        ids: Sequence[str],
        shapes: Mapping[str, tuple[int, ...]],
        unit_rows: int,
        provenance: Mapping[str, object],
        compression: str = COMPRESSIONS[0],
        lease_ttl_s: float | None = None,
    ) -> FeatureEntry:
        """Create the entry for ``key``, or reopen it to resume.

        ``shapes`` maps each pooling of ``key.poolings`` to its per-image shape, e.g.
        ``{"cls": (768,), "patch": (32, 32, 768)}``. An existing entry must match ``key``,
        ``ids`` and ``shapes`` (else :class:`IntegrityError`); its ``unit_rows`` and
        compression are kept. Of several jobs creating one entry at once, one creates the
        layout (under the ``layout`` claim, ttl ``lease_ttl_s``) and the others wait for it.
        """
        ids = list(ids)
        if len(ids) != key.n_images:
            raise IntegrityError(
                f"Expected {key.n_images} image ids (key.n_images), got {len(ids)} instead."
            )
        if digest_ids(ids) != key.ids_digest:
            raise IntegrityError(
                "The image ids do not match key.ids_digest: the key was built for another id "
                "list or order. Build the key with digest_ids(ids) of these ids."
            )
        if set(shapes) != set(key.poolings):
            raise IntegrityError(
                f"Expected shapes for exactly the key's poolings {list(key.poolings)}, "
                f"got {sorted(shapes)} instead."
            )
        norm_shapes = {p: tuple(int(d) for d in shapes[p]) for p in key.poolings}
        for p, shape in norm_shapes.items():
            if not shape or any(d <= 0 for d in shape):
                raise IntegrityError(f"Pooling {p!r}: expected a per-image shape, got {shape}.")
        if isinstance(unit_rows, bool) or not isinstance(unit_rows, int) or unit_rows <= 0:
            raise ValueError(f"Expected unit_rows > 0, got {unit_rows!r} instead.")
        if compression not in COMPRESSIONS:
            raise ValueError(f"Expected compression in {COMPRESSIONS}, got {compression!r}.")

        relpath = key.relpath()
        root.require_writable("create or resume a cache entry in")
        attrs = cls._existing_attrs(root, relpath)
        if attrs is None:
            attrs = cls._create_once(
                root,
                relpath,
                resolve_ttl(lease_ttl_s),
                lambda: cls._create(
                    root, relpath, key, ids, norm_shapes, unit_rows, provenance, compression
                ),
            )
        entry = cls(root, relpath, attrs, writable=True)
        entry._ids = tuple(ids)  # == the stored ids: both match key.ids_digest
        if entry.key != key:
            raise IntegrityError(
                f"The entry at {entry.uri} holds another key (digest {entry.key.digest()}, "
                f"expected {key.digest()}). Remove it with --overwrite."
            )
        if entry.shapes != norm_shapes:
            raise IntegrityError(
                f"The entry at {entry.uri} stores shapes {entry.shapes}, but this run "
                f"produces {norm_shapes}. The encoder output changed without a key change; "
                "fix the key (weights/preprocessing) or remove the entry with --overwrite."
            )
        return entry

    @classmethod
    def _create_once(
        cls, root: CacheRoot, relpath: str, ttl_s: float, create: Callable[[], dict[str, Any]]
    ) -> dict[str, Any]:
        """The attrs of the entry's layout, created by ``create`` in exactly one job."""
        with Leases(root, relpath, ttl_s) as leases:
            while True:
                found = cls._existing_attrs(root, relpath)
                if found is not None:
                    return found
                if leases.acquire(
                    LAYOUT, done=lambda: cls._existing_attrs(root, relpath) is not None
                ):
                    try:
                        return cls._existing_attrs(root, relpath) or create()
                    finally:
                        leases.release(LAYOUT, mark=True)

    @staticmethod
    def _existing_attrs(root: CacheRoot, relpath: str) -> dict[str, Any] | None:
        """Attrs of a fully laid-out entry, or None (missing, or creation was interrupted)."""
        try:
            meta = json.loads(root.read_bytes(f"{relpath}/zarr.json"))
        except (FileNotFoundError, json.JSONDecodeError):
            return None
        attrs = meta.get("attributes") or {}
        return attrs if attrs.get("layout_version") == LAYOUT_VERSION else None

    @staticmethod
    def _create(
        root: CacheRoot,
        relpath: str,
        key: CacheKey,
        ids: Sequence[str],
        shapes: Mapping[str, tuple[int, ...]],
        unit_rows: int,
        provenance: Mapping[str, object],
        compression: str,
    ) -> dict[str, Any]:
        for name in root.listdir(relpath):  # half-created earlier: no unit can be written
            if name != LEASES_DIR:  # the layout claim we hold lives there
                root.remove_tree(f"{relpath}/{name}")
        n = key.n_images
        unit_rows = min(unit_rows, n)
        n_units = -(-n // unit_rows)
        compressors = [ZstdCodec(level=ZSTD_LEVEL)] if compression == "zstd" else None
        itemsize = {
            p: np.dtype("float16" if p == PATCH_POOLING else key.storage_dtype).itemsize
            for p in key.poolings
        }
        poolings: dict[str, dict[str, Any]] = {}
        store = root.zarr_store(relpath)
        try:
            zarr.create_group(store, zarr_format=3)
            for p in key.poolings:
                dtype = "float16" if p == PATCH_POOLING else key.storage_dtype
                shape = (n, *shapes[p])
                zarr.create_array(
                    store,
                    name=f"features/{p}",
                    shape=shape,
                    dtype=dtype,
                    chunks=(
                        _chunk_rows(unit_rows, itemsize[p] * int(np.prod(shapes[p])), compression),
                        *shapes[p],
                    ),
                    compressors=compressors,
                    filters=None,
                    fill_value=0,
                    chunk_key_encoding=_CHUNK_KEYS,
                    dimension_names=None,
                    config=_RUNTIME_CONFIG,
                )
                poolings[p] = {"shape": list(shape), "dtype": dtype}
            ids_arr = zarr.create_array(
                store, name="ids", shape=(n,), dtype=str, chunks=(min(n, 1 << 18),)
            )
            ids_arr[:] = np.array(list(ids), dtype=object)
            zarr.create_array(
                store,
                name="valid",
                shape=(n,),
                dtype="bool",
                chunks=(unit_rows,),
                chunk_key_encoding=_CHUNK_KEYS,
                compressors=None,
                fill_value=False,
                config=_RUNTIME_CONFIG,
            )
            attrs: dict[str, Any] = {
                "embedkit": "feature-entry",
                "key": key.to_dict(),
                "digest": key.digest(),
                "provenance": dict(provenance),
                "unit_rows": unit_rows,
                "n_units": n_units,
                "n_images": n,
                "poolings": poolings,
                "compression": {"name": compression, "level": ZSTD_LEVEL}
                if compression == "zstd"
                else {"name": "none"},
                "created_at": _now(),
                "created_unix": time.time(),
                "created_by": _writer(),
                # Written last (one metadata PUT / file write): marks the layout as complete.
                "layout_version": LAYOUT_VERSION,
            }
            zarr.open_group(store, mode="r+").attrs.put(attrs)
        except OSError as exc:
            raise root.write_error(f"create the cache entry {relpath} in", exc) from exc
        return attrs

    @classmethod
    def open(
        cls,
        root: CacheRoot,
        key_or_relpath_or_digest: CacheKey | str,
        *,
        allow_partial: bool = False,
    ) -> FeatureEntry:
        """Open an entry for reading; incomplete entries need ``allow_partial=True``."""
        relpath = resolve_entry(root, key_or_relpath_or_digest)
        attrs = cls._existing_attrs(root, relpath)
        if attrs is None:
            raise CacheNotFoundError(
                f"No cache entry at {root.url(relpath)}. Run `embedkit extract` to create it, "
                "or list existing entries with `embedkit cache ls`."
            )
        entry = cls(root, relpath, attrs, writable=False)
        if not allow_partial and not entry.is_complete:
            raise IncompleteEntryError(
                f"The cache entry {entry.uri} is incomplete: {len(entry.done_units())} of "
                f"{entry.n_units} units written; rerun the same `embedkit extract` command to "
                "finish it, or pass --allow-partial to read what is there."
            )
        return entry

    # ---- basic facts --------------------------------------------------------------------

    @property
    def uri(self) -> str:
        """Absolute path or URL of the entry."""
        return self.root.url(self.relpath)

    path = uri

    @property
    def poolings(self) -> tuple[str, ...]:
        return tuple(self.shapes)

    @property
    def ids(self) -> tuple[str, ...]:
        if self._ids is None:
            self._ids = tuple(str(x) for x in np.asarray(self._array("ids")[:]).tolist())
        return self._ids

    def _array(self, name: str) -> zarr.Array:
        arr = self._arrays.get(name)
        if arr is None:
            arr = zarr.open_array(self._store, path=name, config=_RUNTIME_CONFIG)
            self._arrays[name] = arr
        return arr

    def _layout(self, name: str) -> ChunkLayout | None:
        """Direct chunk-file access to array ``name`` (local roots, supported codecs only)."""
        if name not in self._layouts:
            local = self.root.local_path
            self._layouts[name] = (
                None
                if local is None
                else ChunkLayout.of(self._array(name), local / self.relpath / name)
            )
        return self._layouts[name]

    def _feature(self, pooling: str) -> zarr.Array:
        return self._array(f"features/{pooling}")

    def unit_bounds(self, u: int) -> tuple[int, int]:
        """Rows ``[start, stop)`` of unit ``u``."""
        if not 0 <= u < self.n_units:
            raise IndexError(f"Expected a unit in [0, {self.n_units}), got {u} instead.")
        start = u * self.unit_rows
        return start, min(start + self.unit_rows, self.n_images)

    def _unit_path(self, u: int) -> str:
        return f"{self.relpath}/units/{u:06d}.json"

    def done_units(self) -> set[int]:
        """Units whose completion record exists."""
        done = set()
        for name in self.root.listdir(f"{self.relpath}/units"):
            m = _UNIT_FILE.match(name)
            if m and int(m.group(1)) < self.n_units:
                done.add(int(m.group(1)))
        return done

    def has_unit(self, u: int) -> bool:
        """Whether unit ``u`` has its completion record (one stat / GET)."""
        return self.root.is_file(self._unit_path(u))

    def pending_units(self) -> list[int]:
        """Units without a completion record, in order."""
        done = self.done_units()
        return [u for u in range(self.n_units) if u not in done]

    def unit_record(self, u: int) -> dict[str, Any]:
        """The completion record of unit ``u``."""
        self.unit_bounds(u)
        try:
            record: dict[str, Any] = json.loads(self.root.read_bytes(self._unit_path(u)))
        except FileNotFoundError as exc:
            raise IncompleteEntryError(f"Unit {u} of {self.uri} has not been written.") from exc
        return record

    @property
    def is_complete(self) -> bool:
        return self.root.exists(f"{self.relpath}/COMPLETE.json")

    def completion(self) -> dict[str, Any] | None:
        """The COMPLETE.json record, or None while incomplete."""
        try:
            record: dict[str, Any] = json.loads(
                self.root.read_bytes(f"{self.relpath}/COMPLETE.json")
            )
        except FileNotFoundError:
            return None
        return record

    # ---- writing ------------------------------------------------------------------------

    def write_unit(
        self,
        u: int,
        arrays: Mapping[str, np.ndarray],
        *,
        valid: np.ndarray,
        skipped: Sequence[tuple[str, str]] = (),
    ) -> None:
        """Write the features of unit ``u`` (all stored poolings), then its completion record.

        Rows where ``valid`` is False are stored as zeros and must be listed in ``skipped``
        as ``(image_id, reason)``. NaN/Inf in valid rows, including float16 overflow of the
        cast, raise :class:`IntegrityError` naming the image ids. The same as
        ``begin_unit(...).commit()``.
        """
        self.begin_unit(u, arrays, valid=valid, skipped=skipped).commit()

    def begin_unit(
        self,
        u: int,
        arrays: Mapping[str, np.ndarray],
        *,
        valid: np.ndarray,
        skipped: Sequence[tuple[str, str]] = (),
    ) -> PendingUnit:
        """Start writing unit ``u`` (as :meth:`write_unit`); :meth:`PendingUnit.commit` ends it.

        On local roots the chunks are written by the pool while this returns, so a writer
        can begin unit ``k + 1`` and then commit unit ``k``: the pool then never waits for
        the caller between units. ``arrays`` must not change until the commit. Arguments and
        an existing record are checked here; NaN/Inf, write errors and a record created by
        another job meanwhile raise from ``commit``, which writes the record only after every
        chunk is written (and synced, with FSYNC).
        """
        if not self._writable:
            raise CacheWriteError(
                f"{self.uri} was opened for reading; use FeatureEntry.create_or_open to write."
            )
        u = operator.index(u)
        start, stop = self.unit_bounds(u)
        rows = stop - start
        if self.root.exists(self._unit_path(u)):
            raise EntryExistsError(
                f"Unit {u} of {self.uri} is already written; units are immutable "
                "(remove the entry with --overwrite to recompute it)."
            )
        if set(arrays) != set(self.shapes):
            raise IntegrityError(
                f"Unit {u}: expected arrays for poolings {sorted(self.shapes)}, "
                f"got {sorted(arrays)} instead."
            )
        valid = np.asarray(valid)
        if valid.dtype != np.bool_ or valid.shape != (rows,):
            raise IntegrityError(
                f"Unit {u}: expected `valid` as a bool array of shape ({rows},), got "
                f"{valid.dtype} {valid.shape} instead."
            )
        unit_ids = self.ids[start:stop]
        invalid_ids = {unit_ids[i] for i in np.flatnonzero(~valid)}
        skipped = [(str(i), str(why)) for i, why in skipped]
        if {i for i, _ in skipped} != invalid_ids:
            raise IntegrityError(
                f"Unit {u}: `skipped` must list exactly the images marked invalid; invalid "
                f"without a reason: {_fmt_ids(sorted(invalid_ids - {i for i, _ in skipped}))}; "
                "listed but valid or not in this unit: "
                f"{_fmt_ids(sorted({i for i, _ in skipped} - invalid_ids))}."
            )

        stored: dict[str, np.ndarray] = {}
        for name, src in arrays.items():
            src = np.asarray(src)
            expected = (rows, *self.shapes[name])
            if src.shape != expected:
                raise IntegrityError(
                    f"Unit {u}, pooling {name!r}: expected shape {expected}, got {src.shape}."
                )
            if src.dtype.kind not in "fiu":
                raise IntegrityError(
                    f"Unit {u}, pooling {name!r}: expected a numeric array, got {src.dtype}."
                )
            with np.errstate(over="ignore", invalid="ignore"):  # overflow is checked below
                out = np.ascontiguousarray(src.astype(self.dtypes[name], copy=False))
            if not valid.all():  # skipped rows are stored as zeros, and not checked
                if np.shares_memory(out, src):
                    out = out.copy()
                out[~valid] = 0
            stored[name] = out

        targets = {f"features/{name}": a for name, a in stored.items()}
        targets["valid"] = np.ascontiguousarray(valid)
        layouts = {name: self._layout(name) for name in targets}
        pending = PendingUnit(self, u, arrays, stored, targets, valid, skipped)
        try:
            if all(layouts.values()):  # the pool scans and writes each chunk
                pending._submit(layouts)  # type: ignore[arg-type]
            else:  # fsspec roots (object stores: a PUT is durable once it returns)
                bad = [f"features/{n}" for n, a in stored.items() if _any_nonfinite_parallel(a)]
                if not bad:
                    for name, a in targets.items():
                        self._array(name)[start:stop] = a
                pending._bad = bad
        except OSError as exc:
            raise self.root.write_error(f"write unit {u} of {self.relpath} in", exc) from exc
        return pending

    def _commit_record(self, u: int, record: dict[str, Any]) -> None:
        # Created exclusively: of two writers of one unit (a job whose claim was taken over
        # while it was paused, see embedkit.store.lease) exactly one record wins.
        if not self.root.create_exclusive(
            self._unit_path(u), json.dumps(record).encode(), durable=FSYNC
        ):
            raise EntryExistsError(
                f"Unit {u} of {self.uri} was written by another job meanwhile (its claim was "
                "taken over); the unit holds that job's identical features."
            )

    def _nonfinite_error(
        self, u: int, name: str, src: np.ndarray, out: np.ndarray, valid: np.ndarray
    ) -> IntegrityError:
        """The error for NaN/Inf in rows ``out`` of pooling ``name`` (cast from ``src``)."""
        unit_ids = self.ids[slice(*self.unit_bounds(u))]
        bad = nonfinite_rows(out) & valid
        bad_ids = [unit_ids[i] for i in np.flatnonzero(bad)]
        src = np.asarray(src)
        if src.dtype.kind == "f" and (nonfinite_rows(src) & valid).any():
            why = "contain NaN or Inf"
            fix = "Check the encoder, its compute dtype and the inputs."
        else:
            why = (
                f"overflow {self.dtypes[name]} when cast from {src.dtype} "
                f"(|x| > {float(np.finfo(self.dtypes[name]).max)})"
            )
            fix = "Use storage dtype float32 if such values are legitimate."
        return IntegrityError(
            f"Unit {u}, pooling {name!r}: the features of {len(bad_ids)} image(s) {why}: "
            f"{_fmt_ids(bad_ids)}. {fix}"
        )

    def finalize(self, extra: Mapping[str, object] | None = None) -> bool:
        """Create COMPLETE.json once every unit has its record; the entry is then immutable.

        The record is created exclusively in one atomic step (hard link / ``If-None-Match``
        PUT), so of several jobs finishing together exactly one writes it: True for that one,
        False for the others. The claims under ``leases/`` are then removed.
        """
        if self.is_complete:
            raise EntryExistsError(
                f"{self.uri} is already complete; completed entries are immutable."
            )
        missing = self.pending_units()
        if missing:
            raise IncompleteEntryError(
                f"Cannot finalize {self.uri}: {len(missing)} of {self.n_units} units are not "
                f"written (units {_fmt_ids([str(m) for m in missing], 20)}). Write them first."
            )
        n_valid = 0
        skipped: list[list[str]] = []
        for u in range(self.n_units):
            record = self.unit_record(u)
            n_valid += int(record["n_valid"])
            skipped.extend(record["skipped"])
        now = time.time()
        completion: dict[str, Any] = {
            "completed_at": _now(),
            "elapsed_s": round(now - float(self.attrs.get("created_unix", now)), 3),
            "n_valid": n_valid,
            "skipped": skipped,
            "writer": _writer(),
        }
        completion.update(extra or {})
        body = json.dumps(completion).encode()
        if not self.root.create_exclusive(f"{self.relpath}/COMPLETE.json", body):
            return False
        with contextlib.suppress(OSError):  # leftover claims are harmless in a complete entry
            self.root.remove_tree(f"{self.relpath}/{LEASES_DIR}")
        return True

    # ---- reading ------------------------------------------------------------------------

    def _components(self, pooling: str) -> tuple[str, ...]:
        if pooling in self.shapes:
            return (pooling,)
        parts = DERIVED_POOLINGS.get(pooling)
        if parts is not None and all(p in self.shapes for p in parts):
            return parts
        derivable = [d for d, ps in DERIVED_POOLINGS.items() if all(p in self.shapes for p in ps)]
        raise CacheNotFoundError(
            f"Pooling {pooling!r} is not stored in {self.uri}; stored: {list(self.shapes)}"
            + (f", derived: {derivable}" if derivable else "")
            + ". Re-extract with that pooling to add it."
        )

    def row_of(self, image_id: str) -> int:
        if self._row_of is None:
            self._row_of = {i: r for r, i in enumerate(self.ids)}
        return self._row_of[image_id]

    def _select(
        self, ids: Sequence[str] | None, rows: np.ndarray | slice | None
    ) -> slice | np.ndarray:
        if ids is not None and rows is not None:
            raise ValueError("Pass either ids= or rows=, not both.")
        if ids is not None:
            if self._row_of is None:
                self._row_of = {i: r for r, i in enumerate(self.ids)}
            lookup = self._row_of
            missing = [i for i in ids if i not in lookup]
            if missing:
                raise CacheNotFoundError(
                    f"{len(missing)} of {len(ids)} requested ids are not in {self.uri}: "
                    f"{_fmt_ids(missing)}. The entry was extracted for another image list."
                )
            return np.fromiter((lookup[i] for i in ids), dtype=np.int64, count=len(ids))
        if rows is None:
            return slice(0, self.n_images)
        if isinstance(rows, slice):
            start, stop, step = rows.indices(self.n_images)
            if step == 1:
                return slice(start, max(start, stop))
            return np.arange(start, stop, step, dtype=np.int64)
        idx = np.asarray(rows)
        if idx.dtype == np.bool_:
            if idx.shape != (self.n_images,):
                raise IndexError(f"Expected a bool mask of shape ({self.n_images},).")
            return np.flatnonzero(idx)
        idx = idx.astype(np.int64, copy=False).reshape(-1)
        if idx.size and (idx.min() < -self.n_images or idx.max() >= self.n_images):
            raise IndexError(f"Row index out of range for {self.n_images} rows.")
        return np.where(idx < 0, idx + self.n_images, idx)

    def _read_into(self, arr: zarr.Array, sel: slice | np.ndarray, out: np.ndarray) -> None:
        try:
            self._read_chunks_into(arr, sel, out)
        except RuntimeError as exc:  # the codec of a damaged chunk (e.g. zstd) fails to decode
            raise IntegrityError(
                f"{self.uri}: {arr.path} cannot be decoded ({exc}); the entry is damaged. "
                "Run `embedkit cache verify` to see which units, then re-extract with --overwrite."
            ) from exc

    def _read_chunks_into(self, arr: zarr.Array, sel: slice | np.ndarray, out: np.ndarray) -> None:
        layout = self._layout(arr.path) if isinstance(sel, slice) else None
        if layout is not None and isinstance(sel, slice):
            layout.read_rows(sel.start, sel.stop, out)
            return
        if out.dtype != arr.dtype:  # cast chunk by chunk: memory stays one chunk
            if isinstance(sel, slice):
                for s in range(sel.start, sel.stop, self.unit_rows):
                    e = min(s + self.unit_rows, sel.stop)
                    out[s - sel.start : e - sel.start] = arr[s:e]
            else:
                for s in range(0, len(sel), self.unit_rows):
                    part = sel[s : s + self.unit_rows]
                    out[s : s + len(part)] = arr.get_orthogonal_selection((part,))
            return
        buf = NDBuffer.from_numpy_array(out)
        if isinstance(sel, slice):
            arr.get_basic_selection(sel, out=buf)
        elif len(sel):
            arr.get_orthogonal_selection((sel,), out=buf)

    def read(
        self,
        pooling: str,
        *,
        ids: Sequence[str] | None = None,
        rows: np.ndarray | slice | None = None,
        out_dtype: Any = None,
    ) -> np.ndarray:
        """Features of one pooling (stored or derived, e.g. ``"cls+mean"``).

        All rows by default, or the rows of ``ids`` (in that order) or ``rows``. Only the
        chunks holding those rows are read; the output is allocated once and filled in place.
        The stored dtype is returned unless ``out_dtype`` is given.
        """
        parts = self._components(pooling)
        sel = self._select(ids, rows)
        if not self._use_noted and not self._writable:  # a reader: mark the entry as used
            self._use_noted = True
            if self.is_complete:
                self.root.touch(
                    f"{self.relpath}/{LAST_USED_FILE}", min_interval_s=LAST_USED_INTERVAL_S
                )
        n = (sel.stop - sel.start) if isinstance(sel, slice) else len(sel)
        if len(parts) == 1:
            dtype = np.dtype(out_dtype) if out_dtype is not None else self.dtypes[parts[0]]
            out = np.empty((n, *self.shapes[parts[0]]), dtype=dtype)
            self._read_into(self._feature(parts[0]), sel, out)
            return out
        for p in parts:
            if len(self.shapes[p]) != 1:
                raise ValueError(f"Derived pooling {pooling!r} needs 1-D parts; {p} is not.")
        dtype = (
            np.dtype(out_dtype)
            if out_dtype is not None
            else np.result_type(*(self.dtypes[p] for p in parts))
        )
        width = sum(self.shapes[p][0] for p in parts)
        out = np.empty((n, width), dtype=dtype)
        offset = 0
        for p in parts:
            d = self.shapes[p][0]
            self._read_into(self._feature(p), sel, out[:, offset : offset + d])
            offset += d
        return out

    def read_rows(self, ids: Sequence[str]) -> np.ndarray:
        """Row numbers of ``ids`` in this entry (missing ids raise CacheNotFoundError)."""
        sel = self._select(ids, None)
        return np.asarray(sel, dtype=np.int64)

    def valid_mask(self) -> np.ndarray:
        """(N,) bool: False for images skipped as unreadable (and for unwritten units)."""
        return np.asarray(self._array("valid")[:], dtype=bool)

    def skipped(self) -> list[tuple[str, str]]:
        """``(image_id, reason)`` of every skipped image written so far."""
        done = self.completion()
        if done is not None:
            return [(str(i), str(r)) for i, r in done["skipped"]]
        out: list[tuple[str, str]] = []
        for u in sorted(self.done_units()):
            out.extend((str(i), str(r)) for i, r in self.unit_record(u)["skipped"])
        return out

    def info(self) -> dict[str, Any]:
        """Key, provenance, completion, units done/total, bytes on disk, shapes."""
        return {
            "relpath": self.relpath,
            "uri": self.uri,
            "digest": self.key.digest(),
            "key": self.key.to_dict(),
            "provenance": self.attrs.get("provenance", {}),
            "created_at": self.attrs.get("created_at"),
            "created_by": self.attrs.get("created_by"),
            "complete": self.is_complete,
            "completion": self.completion(),
            "units_done": len(self.done_units()),
            "units_total": self.n_units,
            "unit_rows": self.unit_rows,
            "n_images": self.n_images,
            "poolings": self.attrs["poolings"],
            "compression": self.attrs.get("compression"),
            "bytes_on_disk": self.root.size_bytes(self.relpath),
        }

    def verify(self) -> list[str]:
        """Re-read everything and return the problems found; ``[]`` means healthy."""
        problems: list[str] = []
        arrays: dict[str, zarr.Array] = {}
        for name, spec in self.attrs["poolings"].items():
            try:
                arr = self._feature(name)
            except (FileNotFoundError, KeyError) as exc:
                problems.append(f"features/{name}: array missing ({exc})")
                continue
            if list(arr.shape) != list(spec["shape"]) or str(arr.dtype) != spec["dtype"]:
                problems.append(
                    f"features/{name}: expected {spec['dtype']} {tuple(spec['shape'])} per attrs, "
                    f"found {arr.dtype} {arr.shape}"
                )
                continue
            if self.unit_rows % arr.chunks[0]:
                problems.append(
                    f"features/{name}: chunks of {arr.chunks[0]} rows straddle units of "
                    f"{self.unit_rows} rows"
                )
            arrays[f"features/{name}"] = arr
        try:
            stored_ids = self.ids
            if len(stored_ids) != self.n_images or digest_ids(stored_ids) != self.key.ids_digest:
                problems.append("ids: the stored image ids do not match key.ids_digest")
        except (FileNotFoundError, KeyError) as exc:
            problems.append(f"ids: array missing ({exc})")
        arrays["valid"] = self._array("valid")
        done = self.done_units()
        for u in range(self.n_units):
            start, stop = self.unit_bounds(u)
            if u not in done:
                problems.append(f"unit {u} (rows {start}-{stop}): no completion record")
                continue
            record = self.unit_record(u)
            if record.get("rows") != [start, stop]:
                problems.append(f"unit {u}: record rows {record.get('rows')} != [{start}, {stop}]")
            try:
                valid = np.asarray(arrays["valid"][start:stop], dtype=bool)
            except Exception as exc:  # a corrupt chunk fails in the codec, whatever its type
                problems.append(f"unit {u} (rows {start}-{stop}): valid cannot be decoded ({exc})")
                continue
            for name, arr in arrays.items():
                try:
                    data = np.asarray(arr[start:stop])
                except Exception as exc:
                    problems.append(
                        f"unit {u} (rows {start}-{stop}): {name} cannot be decoded ({exc})"
                    )
                    continue
                want = record.get("checksums", {}).get(name)
                algorithm = str(record.get("checksum_algorithm", "sha256"))
                if want is None:
                    problems.append(f"unit {u}: no checksum recorded for {name}")
                elif _checksum(data.astype(arr.dtype, copy=False), algorithm) != want:
                    problems.append(f"unit {u} (rows {start}-{stop}): checksum mismatch in {name}")
                if name.startswith("features/"):
                    bad = nonfinite_rows(data) & valid
                    if bad.any():
                        bad_ids = [self.ids[start + i] for i in np.flatnonzero(bad)]
                        problems.append(f"unit {u}: NaN/Inf in {name} for {_fmt_ids(bad_ids)}")
            if int(valid.sum()) != record.get("n_valid"):
                problems.append(
                    f"unit {u}: {int(valid.sum())} valid rows, record says {record.get('n_valid')}"
                )
        if not self.is_complete:
            problems.append(
                f"no COMPLETE.json: entry incomplete ({len(done)} of {self.n_units} units written)"
            )
        return problems


class PendingUnit:
    """A unit being written: from :meth:`FeatureEntry.begin_unit` until :meth:`commit`.

    On local roots every chunk of every array is two pool jobs: one writes it (and starts
    its writeback), the other scans it (NaN/Inf check of float feature arrays and crc32c,
    :func:`embedkit.store.checks.scan`); the scan is CPU work and the write mostly memory
    copying, so the two cores overlap them. The unit's checksum of each array joins those of
    its chunks (:func:`crc32c_combine`). ``commit`` waits for the jobs, fdatasyncs the files
    and their directory (with FSYNC; most data is on disk by then), and only then writes the
    record. A unit holding NaN/Inf gets no record: its chunk files are never read as data and
    are overwritten when the unit is redone.
    """

    def __init__(
        self,
        entry: FeatureEntry,
        u: int,
        arrays: Mapping[str, np.ndarray],
        stored: Mapping[str, np.ndarray],
        targets: Mapping[str, np.ndarray],
        valid: np.ndarray,
        skipped: Sequence[tuple[str, str]],
    ) -> None:
        self.entry = entry
        self.unit = u
        self._arrays = arrays
        self._stored = stored
        self._targets = targets
        self._valid = valid
        self._skipped = skipped
        self._chunks: list[tuple[ChunkLayout, int, str]] = []
        self._scans: list[Future[Scan]] = []
        self._writes: list[Future[list[Path]]] = []
        self._bad: list[str] | None = None  # set once the data are written (fsspec roots)
        self._committed = False

    def _submit(self, layouts: Mapping[str, ChunkLayout]) -> None:
        start, stop = self.entry.unit_bounds(self.unit)
        for name, a in self._targets.items():
            layout = layouts[name]
            for i in layout.chunks_in(start, stop):
                c0, c1 = layout.chunk_bounds(i)
                part = a[c0 - start : c1 - start]
                self._chunks.append((layout, i, name))
                check = name.startswith("features/")
                self._scans.append(POOL.submit(scan, part, check=check))
                self._writes.append(
                    POOL.submit(layout.write_chunk, i, part, durable=FSYNC, sync=False)
                )

    def _wait(self) -> tuple[dict[str, int | None], list[str], list[Path]]:
        """Wait for every chunk job: (crc32c per array, arrays with NaN/Inf, dirs to fsync)."""
        crcs: dict[str, int | None] = {}
        bad: list[str] = []
        dirs: list[Path] = []
        jobs: list[Future[Any]] = [*self._scans, *self._writes]
        try:
            for scanned, write, (_, _, name) in zip(
                self._scans, self._writes, self._chunks, strict=True
            ):
                found = scanned.result()
                dirs.extend(write.result())
                if not found.finite:
                    bad.append(name)
                    continue
                so_far = crcs.get(name, 0)  # the crc32c of no bytes is 0
                crcs[name] = (
                    None
                    if so_far is None or found.crc32c is None
                    else crc32c_combine(so_far, found.crc32c, found.nbytes)
                )
        finally:
            for job in jobs:
                job.cancel()
        return crcs, bad, dirs

    def commit(self) -> None:
        """Wait for the unit's chunks, make them durable (FSYNC), then write its record."""
        if self._committed:
            raise EntryExistsError(f"Unit {self.unit} of {self.entry.uri} is already committed.")
        self._committed = True
        entry, u = self.entry, self.unit
        try:
            if self._bad is None:
                crcs, bad, dirs = self._wait()
                if not bad and FSYNC:
                    for layout, i, _ in self._chunks:  # on this thread: the pool writes on
                        layout.sync_chunk(i)
                    fsync_dirs(dirs)
            else:
                crcs, bad = {}, self._bad
        except OSError as exc:
            raise entry.root.write_error(f"write unit {u} of {entry.relpath} in", exc) from exc
        if bad:
            name = bad[0].removeprefix("features/")
            raise entry._nonfinite_error(
                u, name, self._arrays[name], self._stored[name], self._valid
            )
        checksums = {
            name: f"{crc:08x}"
            if CHECKSUM_ALGORITHM == "crc32c" and (crc := crcs.get(name)) is not None
            else _checksum(a)
            for name, a in self._targets.items()
        }
        start, stop = entry.unit_bounds(u)
        record = {
            "unit": u,
            "rows": [start, stop],
            "checksum_algorithm": CHECKSUM_ALGORITHM,
            "checksums": checksums,
            "n_valid": int(self._valid.sum()),
            "skipped": [list(s) for s in self._skipped],
            "written_at": _now(),
            "writer": _writer(),
        }
        entry._commit_record(u, record)


def remove_entry(root: CacheRoot, key: CacheKey | str) -> None:
    """Delete an entry (for ``--overwrite``); refused while a job is writing it.

    "Writing" means: an unreleased claim on an unwritten unit (or on the layout) modified
    within twice its ttl (see :func:`embedkit.store.lease.live_claims`), or, on local roots,
    its lock file held (a copy into it).
    """
    relpath = resolve_entry(root, key)
    if not root.exists(relpath):
        raise CacheNotFoundError(f"No cache entry at {root.url(relpath)}; nothing to remove.")
    root.require_writable(f"remove {relpath} from")
    live = live_claims(root, relpath)
    if live:
        raise CacheWriteError(
            f"{root.url(relpath)} is being written by another job ({len(live)} live claims, "
            f"e.g. {root.url(live[0])}); wait for it to finish or stop it before --overwrite. "
            "A stopped job's claims stop counting after twice their ttl."
        )
    lock = root.lock(relpath)
    if isinstance(lock, filelock.BaseFileLock):
        try:
            lock.acquire(timeout=0)
        except filelock.Timeout as exc:
            raise CacheWriteError(
                f"{root.url(relpath)} is being written by another process (lock {lock.lock_file} "
                "is held); wait for it to finish or stop it before --overwrite."
            ) from exc
        try:
            root.remove_tree(relpath)
        finally:
            lock.release()
    else:
        root.remove_tree(relpath)
