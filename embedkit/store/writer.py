"""Writing a feature cache entry: its layout, its units, its completion record.

Each work unit is a whole number of chunks of every array, so writers of different units never
touch the same object (zarr loses data when writers share a shard). Two jobs never compute the
same unit: each claims a unit before computing it (:class:`embedkit.store.lease.Leases`), on
every backend. The layout is created by one job under the ``layout`` claim
(:func:`create_or_open_layout`).

On local roots the chunk files are written by :mod:`embedkit.store.chunkio` (same Zarr v3
files, byte for byte, ~10x faster than zarr-python); zarr-python writes metadata and the
chunks of fsspec roots.

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
import json
import operator
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np
import zarr
from zarr.codecs import ZstdCodec
from zarr.core.chunk_key_encodings import ChunkKeyEncodingParams

from embedkit.errors import CacheWriteError, EntryExistsError, IncompleteEntryError, IntegrityError
from embedkit.store.checks import (
    CHECKSUM_ALGORITHM,
    Scan,
    any_nonfinite,
    checksum,
    crc32c_combine,
    nonfinite_rows,
    scan,
)
from embedkit.store.chunkio import POOL, ChunkLayout, fsync_dirs
from embedkit.store.key import CacheKey, digest_ids
from embedkit.store.layout import (
    IMAGE_ARRAY,
    IMAGE_DIM,
    LAYOUT_VERSION,
    LEASES_DIR,
    PATCH_POOLING,
    RESERVED_NAMES,
    RUNTIME_CONFIG,
    VALID_ARRAY,
    EntryLayout,
    dimension_names,
    existing_attrs,
    feature_array,
    fmt_ids,
    is_feature_array,
    now_iso,
    writer_identity,
)
from embedkit.store.lease import LAYOUT, Leases, resolve_ttl
from embedkit.store.root import CacheRoot

__all__ = [
    "CHUNK_BYTES",
    "CHUNK_KEYS",
    "COMPRESSIONS",
    "FSYNC",
    "ZSTD_LEVEL",
    "Compression",
    "EntryWriter",
    "PendingUnit",
    "chunk_rows",
    "create_or_open_layout",
]

#: ``compression=`` choices for new entries; the first is the default. Chosen by measurement
#: (benchmarks/RESULTS.md, "Feature store"): zstd saves only 8% of float16 features (their
#: mantissa bits are noise; Blosc byte/bit shuffles with lz4, blosclz or zstd save 0-8%) and
#: decodes at ~1.5 GB/s per core (0.7-0.8 CPU-s per GB in the store, vs ~0.1 for a raw read),
#: so full reads of a zstd entry ran at 0.19x np.load vs 0.94x uncompressed, and writes cost
#: 3x the CPU. Features are written once and read by every probe: "none" is the default; "zstd"
#: is there for archives and slow links, where 8% matters more than read speed.
Compression = Literal["none", "zstd"]
COMPRESSIONS: tuple[Compression, ...] = get_args(Compression)
#: zstd level for new entries: level 1 saves ~8% on float16 features at ~0.8 GB/s per core;
#: higher levels save nothing more and are slower; levels < 1 store raw (see RESULTS.md).
ZSTD_LEVEL = 1
#: A unit is split into chunks of about this size (a whole number per unit), which the
#: 2-thread pool scans, compresses, writes and reads in parallel (one file per chunk). Raw:
#: measured on 32 MB units (bench_store.py), 8/16/32 MB chunks wrote at 0.63/0.74-0.93/0.66x
#: np.save (16 MB: one chunk per pool thread; smaller files cost per-file work); zstd: ~4 MB,
#: so both threads compress.
CHUNK_BYTES: dict[str, int] = {"none": 16 << 20, "zstd": 4 << 20}
#: Make each unit's chunk files durable (fdatasync) before its record is written, and the
#: record itself (fsync) before ``write_unit`` returns; see the module docstring. Costs disk
#: bandwidth and latency (see benchmarks/RESULTS.md); only scratch caches should turn it off.
FSYNC = True
#: Chunk files ``c.<i>.0`` side by side in the array's directory (Zarr v3 "default" encoding
#: with the "." separator): a unit's chunks then add entries to one directory, the only one
#: to fsync, where "/" makes a directory per chunk (``c/<i>/0``), each to create and fsync.
#: Entries written with "/" read the same (the layout comes from the array metadata).
CHUNK_KEYS: ChunkKeyEncodingParams = {"name": "default", "separator": "."}


def chunk_rows(unit_rows: int, row_nbytes: int, compression: str) -> int:
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


def _any_nonfinite_parallel(a: np.ndarray) -> bool:
    """:func:`any_nonfinite` on two halves at once (numpy reductions release the GIL)."""
    if a.shape[0] < 2 or a.nbytes < 1 << 22:
        return any_nonfinite(a)
    half = a.shape[0] // 2
    other = POOL.submit(any_nonfinite, a[half:])
    return any_nonfinite(a[:half]) | other.result()


# ---- the layout ---------------------------------------------------------------------------


def create_or_open_layout(
    root: CacheRoot,
    key: CacheKey,
    *,
    ids: Sequence[str],
    shapes: Mapping[str, tuple[int, ...]],
    unit_rows: int,
    provenance: Mapping[str, object],
    compression: str = COMPRESSIONS[0],
    lease_ttl_s: float | None = None,
) -> EntryLayout:
    """The layout of the entry for ``key``, created now or found (to resume); see
    :meth:`embedkit.store.entry.FeatureEntry.create_or_open`."""
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
    reserved = sorted(RESERVED_NAMES & set(key.poolings))
    if reserved:
        raise IntegrityError(
            f"Pooling names {reserved} are taken by the entry's other arrays "
            f"({sorted(RESERVED_NAMES)}); name the pooling otherwise."
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
    attrs = existing_attrs(root, relpath)
    if attrs is None:
        attrs = create_once(
            root,
            relpath,
            resolve_ttl(lease_ttl_s),
            lambda: create_layout(
                root, relpath, key, ids, norm_shapes, unit_rows, provenance, compression
            ),
        )
    layout = EntryLayout(root, relpath, attrs, writable=True)
    layout.cached_ids = tuple(ids)  # == the stored ids: both match key.ids_digest
    if layout.key != key:
        raise IntegrityError(
            f"The entry at {layout.uri} holds another key (digest {layout.key.digest()}, "
            f"expected {key.digest()}). Remove it with --overwrite."
        )
    if layout.shapes != norm_shapes:
        raise IntegrityError(
            f"The entry at {layout.uri} stores shapes {layout.shapes}, but this run "
            f"produces {norm_shapes}. The encoder output changed without a key change; "
            "fix the key (weights/preprocessing) or remove the entry with --overwrite."
        )
    return layout


def create_once(
    root: CacheRoot, relpath: str, ttl_s: float, create: Callable[[], dict[str, Any]]
) -> dict[str, Any]:
    """The attrs of the entry's layout, created by ``create`` in exactly one job."""
    with Leases(root, relpath, ttl_s) as leases:
        while True:
            found = existing_attrs(root, relpath)
            if found is not None:
                return found
            if leases.acquire(LAYOUT, done=lambda: existing_attrs(root, relpath) is not None):
                try:
                    return existing_attrs(root, relpath) or create()
                finally:
                    leases.release(LAYOUT, mark=True)


def create_layout(
    root: CacheRoot,
    relpath: str,
    key: CacheKey,
    ids: Sequence[str],
    shapes: Mapping[str, tuple[int, ...]],
    unit_rows: int,
    provenance: Mapping[str, object],
    compression: str,
) -> dict[str, Any]:
    """Create the entry's group and arrays (its metadata, no data); returns its attrs.

    Every array has Zarr ``dimension_names`` (:func:`embedkit.store.layout.dimension_names`)
    and the ids are the ``image`` coordinate, so xarray opens the entry as a Dataset indexed by
    image id; the group's metadata is consolidated (arrays never change after this), so
    ``xarray.open_zarr`` finds them in one read and does not warn.
    """
    _clear_half_created(root, relpath)
    n = key.n_images
    unit_rows = min(unit_rows, n)
    n_units = -(-n // unit_rows)
    compressors = [ZstdCodec(level=ZSTD_LEVEL)] if compression == "zstd" else None
    itemsize = {
        p: np.dtype("float16" if p == PATCH_POOLING else key.storage_dtype).itemsize
        for p in key.poolings
    }
    poolings: dict[str, dict[str, Any]] = {}
    dims = dimension_names(shapes)
    store = root.zarr_store(relpath)
    try:
        zarr.create_group(store, zarr_format=3)
        for p in key.poolings:
            dtype = "float16" if p == PATCH_POOLING else key.storage_dtype
            shape = (n, *shapes[p])
            zarr.create_array(
                store,
                name=feature_array(p),
                shape=shape,
                dtype=dtype,
                chunks=(
                    chunk_rows(unit_rows, itemsize[p] * int(np.prod(shapes[p])), compression),
                    *shapes[p],
                ),
                compressors=compressors,
                filters=None,
                fill_value=0,
                chunk_key_encoding=CHUNK_KEYS,
                dimension_names=dims[p],
                config=RUNTIME_CONFIG,
            )
            poolings[p] = {"shape": list(shape), "dtype": dtype}
        # Uncompressed (vlen-utf8 only): the ids are small, and readable without zarr.
        ids_arr = zarr.create_array(
            store,
            name=IMAGE_ARRAY,
            shape=(n,),
            dtype=str,
            chunks=(min(n, 1 << 18),),
            compressors=None,
            dimension_names=(IMAGE_DIM,),
        )
        ids_arr[:] = np.array(list(ids), dtype=object)
        zarr.create_array(
            store,
            name=VALID_ARRAY,
            shape=(n,),
            dtype="bool",
            chunks=(unit_rows,),
            chunk_key_encoding=CHUNK_KEYS,
            compressors=None,
            fill_value=False,
            dimension_names=(IMAGE_DIM,),
            config=RUNTIME_CONFIG,
        )
        with warnings.catch_warnings():  # "not part of the Zarr format 3 specification": the
            # consolidated metadata is a copy; readers that ignore it list the group instead
            warnings.filterwarnings("ignore", "Consolidated metadata", UserWarning)
            group = zarr.consolidate_metadata(store)
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
            "created_at": now_iso(),
            "created_unix": time.time(),
            "created_by": writer_identity(),
            # Written last (one metadata PUT / file write): marks the layout as complete.
            "layout_version": LAYOUT_VERSION,
        }
        group.attrs.put(attrs)  # one write of zarr.json: attrs and consolidated metadata
    except OSError as exc:
        raise root.write_error(f"create the cache entry {relpath} in", exc) from exc
    return attrs


def _clear_half_created(root: CacheRoot, relpath: str) -> None:
    """Remove what an interrupted creation of the layout left, except the claims (the layout
    claim we hold lives under :data:`LEASES_DIR`). No unit can have been written."""
    base = relpath
    for part in LEASES_DIR.split("/"):
        for name in root.listdir(base):
            if name != part:
                root.remove_tree(f"{base}/{name}")
        base = f"{base}/{part}"


# ---- units and completion -----------------------------------------------------------------


class EntryWriter:
    """Writes the units and the completion record of one entry (opened for writing)."""

    def __init__(self, layout: EntryLayout) -> None:
        self.layout = layout

    def write_unit(
        self,
        u: int,
        arrays: Mapping[str, np.ndarray],
        *,
        valid: np.ndarray,
        skipped: Sequence[tuple[str, str]] = (),
    ) -> None:
        """``begin_unit(...).commit()``; see :meth:`FeatureEntry.write_unit`."""
        self.begin_unit(u, arrays, valid=valid, skipped=skipped).commit()

    def begin_unit(
        self,
        u: int,
        arrays: Mapping[str, np.ndarray],
        *,
        valid: np.ndarray,
        skipped: Sequence[tuple[str, str]] = (),
        record_extra: Mapping[str, Any] | None = None,
    ) -> PendingUnit:
        """Check the arguments, cast the arrays and start writing unit ``u``; see
        :meth:`FeatureEntry.begin_unit`. ``record_extra``: more fields of the unit's record
        (e.g. the rows' image fingerprints and where copied rows came from)."""
        lay = self.layout
        if not lay.writable:
            raise CacheWriteError(
                f"{lay.uri} was opened for reading; use FeatureEntry.create_or_open to write."
            )
        u = operator.index(u)
        start, stop = lay.unit_bounds(u)
        rows = stop - start
        if lay.root.exists(lay.unit_path(u)):
            raise EntryExistsError(
                f"Unit {u} of {lay.uri} is already written; units are immutable "
                "(remove the entry with --overwrite to recompute it)."
            )
        if set(arrays) != set(lay.shapes):
            raise IntegrityError(
                f"Unit {u}: expected arrays for poolings {sorted(lay.shapes)}, "
                f"got {sorted(arrays)} instead."
            )
        valid = np.asarray(valid)
        if valid.dtype != np.bool_ or valid.shape != (rows,):
            raise IntegrityError(
                f"Unit {u}: expected `valid` as a bool array of shape ({rows},), got "
                f"{valid.dtype} {valid.shape} instead."
            )
        unit_ids = lay.ids[start:stop]
        invalid_ids = {unit_ids[i] for i in np.flatnonzero(~valid)}
        skipped = [(str(i), str(why)) for i, why in skipped]
        if {i for i, _ in skipped} != invalid_ids:
            raise IntegrityError(
                f"Unit {u}: `skipped` must list exactly the images marked invalid; invalid "
                f"without a reason: {fmt_ids(sorted(invalid_ids - {i for i, _ in skipped}))}; "
                "listed but valid or not in this unit: "
                f"{fmt_ids(sorted({i for i, _ in skipped} - invalid_ids))}."
            )

        stored: dict[str, np.ndarray] = {}
        for name, src in arrays.items():
            src = np.asarray(src)
            expected = (rows, *lay.shapes[name])
            if src.shape != expected:
                raise IntegrityError(
                    f"Unit {u}, pooling {name!r}: expected shape {expected}, got {src.shape}."
                )
            if src.dtype.kind not in "fiu":
                raise IntegrityError(
                    f"Unit {u}, pooling {name!r}: expected a numeric array, got {src.dtype}."
                )
            with np.errstate(over="ignore", invalid="ignore"):  # overflow is checked below
                out = np.ascontiguousarray(src.astype(lay.dtypes[name], copy=False))
            if not valid.all():  # skipped rows are stored as zeros, and not checked
                if np.shares_memory(out, src):
                    out = out.copy()
                out[~valid] = 0
            stored[name] = out

        targets = {feature_array(name): a for name, a in stored.items()}
        targets[VALID_ARRAY] = np.ascontiguousarray(valid)
        layouts = {name: lay.chunk_layout(name) for name in targets}
        pending = PendingUnit(self, u, arrays, stored, targets, valid, skipped)
        pending.record_extra = dict(record_extra or {})
        try:
            if all(layouts.values()):  # the pool scans and writes each chunk
                pending.submit(layouts)  # type: ignore[arg-type]
            else:  # fsspec roots (object stores: a PUT is durable once it returns)
                bad = [feature_array(n) for n, a in stored.items() if _any_nonfinite_parallel(a)]
                if not bad:
                    for name, a in targets.items():
                        lay.array(name)[start:stop] = a
                pending.written_with_nonfinite(bad)
        except OSError as exc:
            raise lay.root.write_error(f"write unit {u} of {lay.relpath} in", exc) from exc
        return pending

    def commit_record(self, u: int, record: dict[str, Any]) -> None:
        """Create unit ``u``'s completion record (exclusively)."""
        lay = self.layout
        # Created exclusively: of two writers of one unit (a job whose claim was taken over
        # while it was paused, see embedkit.store.lease) exactly one record wins.
        if not lay.root.create_exclusive(
            lay.unit_path(u), json.dumps(record).encode(), durable=FSYNC
        ):
            raise EntryExistsError(
                f"Unit {u} of {lay.uri} was written by another job meanwhile (its claim was "
                "taken over); the unit holds that job's identical features."
            )

    def nonfinite_error(
        self, u: int, name: str, src: np.ndarray, out: np.ndarray, valid: np.ndarray
    ) -> IntegrityError:
        """The error for NaN/Inf in rows ``out`` of pooling ``name`` (cast from ``src``)."""
        lay = self.layout
        unit_ids = lay.ids[slice(*lay.unit_bounds(u))]
        bad = nonfinite_rows(out) & valid
        bad_ids = [unit_ids[i] for i in np.flatnonzero(bad)]
        src = np.asarray(src)
        if src.dtype.kind == "f" and (nonfinite_rows(src) & valid).any():
            why = "contain NaN or Inf"
            fix = "Check the encoder, its compute dtype and the inputs."
        else:
            why = (
                f"overflow {lay.dtypes[name]} when cast from {src.dtype} "
                f"(|x| > {float(np.finfo(lay.dtypes[name]).max)})"
            )
            fix = "Use storage dtype float32 if such values are legitimate."
        return IntegrityError(
            f"Unit {u}, pooling {name!r}: the features of {len(bad_ids)} image(s) {why}: "
            f"{fmt_ids(bad_ids)}. {fix}"
        )

    def finalize(self, extra: Mapping[str, object] | None = None) -> bool:
        """Create the completion record once every unit has its record; see
        :meth:`FeatureEntry.finalize`."""
        lay = self.layout
        if lay.is_complete:
            raise EntryExistsError(
                f"{lay.uri} is already complete; completed entries are immutable."
            )
        done = lay.done_units()
        missing = [u for u in range(lay.n_units) if u not in done]
        if missing:
            raise IncompleteEntryError(
                f"Cannot finalize {lay.uri}: {len(missing)} of {lay.n_units} units are not "
                f"written (units {fmt_ids([str(m) for m in missing], 20)}). Write them first."
            )
        n_valid = 0
        skipped: list[list[str]] = []
        for u in range(lay.n_units):
            record = lay.unit_record(u)
            n_valid += int(record["n_valid"])
            skipped.extend(record["skipped"])
        now = time.time()
        completion: dict[str, Any] = {
            "completed_at": now_iso(),
            "elapsed_s": round(now - float(lay.attrs.get("created_unix", now)), 3),
            "n_valid": n_valid,
            "skipped": skipped,
            "writer": writer_identity(),
        }
        completion.update(extra or {})
        body = json.dumps(completion).encode()
        if not lay.root.create_exclusive(lay.complete_path, body):
            return False
        with contextlib.suppress(OSError):  # leftover claims are harmless in a complete entry
            lay.root.remove_tree(f"{lay.relpath}/{LEASES_DIR}")
        return True


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
        writer: EntryWriter,
        u: int,
        arrays: Mapping[str, np.ndarray],
        stored: Mapping[str, np.ndarray],
        targets: Mapping[str, np.ndarray],
        valid: np.ndarray,
        skipped: Sequence[tuple[str, str]],
    ) -> None:
        self.writer = writer
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
        #: Fields added to the unit's record (set by ``begin_unit``).
        self.record_extra: dict[str, Any] = {}

    def submit(self, layouts: Mapping[str, ChunkLayout]) -> None:
        """Hand every chunk of the unit to the pool: a write job and a scan job each."""
        start, stop = self.writer.layout.unit_bounds(self.unit)
        for name, a in self._targets.items():
            layout = layouts[name]
            for i in layout.chunks_in(start, stop):
                c0, c1 = layout.chunk_bounds(i)
                part = a[c0 - start : c1 - start]
                self._chunks.append((layout, i, name))
                check = is_feature_array(name)
                self._scans.append(POOL.submit(scan, part, check=check))
                self._writes.append(
                    POOL.submit(layout.write_chunk, i, part, durable=FSYNC, sync=False)
                )

    def written_with_nonfinite(self, bad: list[str]) -> None:
        """The data were written synchronously (fsspec roots); ``bad``: arrays with NaN/Inf."""
        self._bad = bad

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
        lay, u = self.writer.layout, self.unit
        if self._committed:
            raise EntryExistsError(f"Unit {u} of {lay.uri} is already committed.")
        self._committed = True
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
            raise lay.root.write_error(f"write unit {u} of {lay.relpath} in", exc) from exc
        if bad:
            name = next(p for p in self._stored if feature_array(p) == bad[0])
            raise self.writer.nonfinite_error(
                u, name, self._arrays[name], self._stored[name], self._valid
            )
        checksums = {
            name: f"{crc:08x}"
            if CHECKSUM_ALGORITHM == "crc32c" and (crc := crcs.get(name)) is not None
            else checksum(a)
            for name, a in self._targets.items()
        }
        start, stop = lay.unit_bounds(u)
        record = {
            "unit": u,
            "rows": [start, stop],
            "checksum_algorithm": CHECKSUM_ALGORITHM,
            "checksums": checksums,
            "n_valid": int(self._valid.sum()),
            "skipped": [list(s) for s in self._skipped],
            "written_at": now_iso(),
            "writer": writer_identity(),
        }
        record.update({k: v for k, v in self.record_extra.items() if k not in record})
        self.writer.commit_record(u, record)
