"""Reading a feature cache entry: poolings (stored or derived), rows by id, whole arrays.

On local roots full-range reads are served by :mod:`embedkit.store.chunkio` straight into a
preallocated output (chunks in parallel); zarr-python serves fsspec roots and row-index reads,
chunk by chunk when the output dtype differs, so memory stays one chunk beyond the output.

Reads are checked (``verify=True``, the default): every unit of an array a read touches is
compared with its unit record (the crc32c of the unit's rows, joined from the crc32c of its
chunks with :func:`~embedkit.store.checks.crc32c_combine`) and its features scanned for
NaN/Inf, the first time this reader reads it. A missing, short or undecodable chunk, a
checksum mismatch, NaN/Inf, or a missing record in a complete entry raise
:class:`IntegrityError` naming the entry, array, unit and rows, and ``embedkit cache repair``.
Unit-aligned slice reads on local roots (whole-array reads) read and check each chunk in one
pool job (:meth:`ChunkLayout.read_rows_scanned`); other reads check the units they touch
first, then read the rows asked for. ``verify=False`` reads without any of this (for data
verified already, e.g. by ``embedkit cache verify``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import zarr
from zarr.core.buffer.cpu import NDBuffer

from embedkit.errors import CacheNotFoundError, IncompleteEntryError, IntegrityError
from embedkit.store.checks import checksum, crc32c_combine, nonfinite_rows
from embedkit.store.chunkio import ChunkDecodeError
from embedkit.store.layout import (
    DERIVED_POOLINGS,
    LAST_USED_FILE,
    LAST_USED_INTERVAL_S,
    VALID_ARRAY,
    EntryLayout,
    fmt_ids,
    is_feature_array,
    unit_record_name,
)

__all__ = ["EntryReader"]

Selection = slice | np.ndarray


class EntryReader:
    """Reads the arrays of one entry (opened for reading or writing)."""

    def __init__(self, layout: EntryLayout, *, verify: bool = True) -> None:
        self.layout = layout
        #: Whether reads check what they read (see the module docstring).
        self.verify = verify
        self._row_of: dict[str, int] | None = None
        self._use_noted = False
        self._records: dict[int, dict[str, Any] | None] = {}
        self._checked: set[tuple[str, int]] = set()  # (array, unit) read and found intact

    # ---- checks -------------------------------------------------------------------------

    def damaged(self, name: str, u: int | None, why: str) -> IntegrityError:
        """The error for damage found in array ``name`` (unit ``u``) of this entry."""
        lay = self.layout
        where = name
        if u is not None:
            start, stop = lay.unit_bounds(u)
            where = f"{name}, unit {u} (rows {start}-{stop})"
        return IntegrityError(
            f"Cache entry {lay.key.short()} at {lay.uri} is damaged: {where}: {why}. "
            f"Repair it with `embedkit cache repair {lay.key.short()} --cache {lay.root.url()}` "
            "(recomputes the damaged units from the images)."
        )

    def record(self, u: int) -> dict[str, Any] | None:
        """Unit ``u``'s completion record (read once), or None if the unit is not written."""
        if u not in self._records:
            try:
                rec: dict[str, Any] | None = self.layout.unit_record(u)
            except IncompleteEntryError:
                rec = None
            except (ValueError, OSError) as exc:  # bad JSON, unreadable object
                raise self.damaged(unit_record_name(u), u, f"unreadable record ({exc})") from exc
            if rec is not None and not isinstance(rec, dict):
                raise self.damaged(unit_record_name(u), u, "the record is not a JSON object")
            self._records[u] = rec
        return self._records[u]

    def _written_record(self, name: str, u: int) -> dict[str, Any]:
        record = self.record(u)
        if record is not None:
            return record
        if self.layout.is_complete:
            raise self.damaged(name, u, "its unit record is missing")
        raise IncompleteEntryError(
            f"Unit {u} of {self.layout.uri} has not been written yet; its rows are not data."
        )

    def _compare(
        self,
        name: str,
        u: int,
        record: dict[str, Any],
        data: np.ndarray,
        crc: int | None,
        *,
        scanned: bool = False,
    ) -> None:
        """Raise unless ``data`` (unit ``u`` of ``name``) matches ``record`` and is finite
        (``scanned``: found finite already, by the scan that summed it)."""
        checksums = record.get("checksums")
        want = checksums.get(name) if isinstance(checksums, dict) else None
        if want is None:
            raise self.damaged(name, u, "the unit record holds no checksum for it")
        algorithm = str(record.get("checksum_algorithm", "sha256"))
        got = f"{crc:08x}" if crc is not None and algorithm == "crc32c" else None
        if got is None:
            got = checksum(data, algorithm)
        if got != want:
            raise self.damaged(
                name, u, f"checksum mismatch ({algorithm} {got}, the unit record says {want})"
            )
        if is_feature_array(name) and data.dtype.kind == "f" and not scanned:
            bad = np.flatnonzero(nonfinite_rows(data))  # skipped rows are stored as zeros
            if bad.size:
                start = self.layout.unit_bounds(u)[0]
                ids = [self.layout.ids[start + int(i)] for i in bad]
                raise self.damaged(name, u, f"NaN/Inf in the rows of {fmt_ids(ids)}")

    def check_unit_of(self, arr: zarr.Array[Any], u: int) -> None:
        """Read unit ``u`` of ``arr`` and check it against its record (once per reader)."""
        name = arr.path
        if (name, u) in self._checked:
            return
        record = self._written_record(name, u)
        start, stop = self.layout.unit_bounds(u)
        data = np.empty((stop - start, *arr.shape[1:]), dtype=arr.dtype)
        self._raw_read(arr, slice(start, stop), data, u)
        self._compare(name, u, record, data, None)
        self._checked.add((name, u))

    def _units_of(self, sel: Selection) -> list[int]:
        unit_rows = self.layout.unit_rows
        if isinstance(sel, slice):
            if sel.stop <= sel.start:
                return []
            return list(range(sel.start // unit_rows, (sel.stop - 1) // unit_rows + 1))
        return sorted({int(r) // unit_rows for r in np.unique(sel)}) if len(sel) else []

    def _read_checked(self, arr: zarr.Array[Any], sel: Selection, out: np.ndarray) -> None:
        name, lay = arr.path, self.layout
        todo = [u for u in self._units_of(sel) if (name, u) not in self._checked]
        chunks = lay.chunk_layout(name)
        fused = (
            todo
            and chunks is not None
            and isinstance(sel, slice)
            and out.dtype == arr.dtype
            and out.flags.c_contiguous
            and sel.start % lay.unit_rows == 0
            and (sel.stop % lay.unit_rows == 0 or sel.stop == lay.n_images)
        )
        if fused and chunks is not None and isinstance(sel, slice):
            records = {u: self._written_record(name, u) for u in todo}
            try:
                scans = chunks.read_rows_scanned(
                    sel.start, sel.stop, out, check=is_feature_array(name)
                )
            except (ChunkDecodeError, OSError):
                scans = None  # found again, with its unit, by the unit-by-unit check below
            if scans is not None:
                crcs: dict[int, int | None] = {}
                finite: dict[int, bool] = {}
                for i, found in scans:
                    u = chunks.chunk_bounds(i)[0] // lay.unit_rows
                    so_far = crcs.get(u, 0)
                    crcs[u] = (
                        None
                        if so_far is None or found.crc32c is None
                        else crc32c_combine(so_far, found.crc32c, found.nbytes)
                    )
                    finite[u] = finite.get(u, True) and found.finite
                for u in todo:
                    if not finite[u]:
                        break  # located and named by the check below
                    s, e = lay.unit_bounds(u)
                    part = out[s - sel.start : e - sel.start]
                    self._compare(name, u, records[u], part, crcs[u], scanned=True)
                    self._checked.add((name, u))
                else:
                    return
        for u in todo:
            self.check_unit_of(arr, u)
        self._raw_read(arr, sel, out, None)

    def _raw_read(
        self, arr: zarr.Array[Any], sel: Selection, out: np.ndarray, u: int | None
    ) -> None:
        try:
            self._read_chunks_into(arr, sel, out)
        except (ChunkDecodeError, RuntimeError, ValueError, OSError) as exc:
            # a damaged chunk: missing or short (chunkio), or failing in zarr's codecs
            raise self.damaged(arr.path, u, f"cannot be read ({exc})") from exc

    def components(self, pooling: str) -> tuple[str, ...]:
        """The stored poolings that make ``pooling`` (itself, or the parts of a derived one)."""
        shapes = self.layout.shapes
        if pooling in shapes:
            return (pooling,)
        parts = DERIVED_POOLINGS.get(pooling)
        if parts is not None and all(p in shapes for p in parts):
            return parts
        derivable = [d for d, ps in DERIVED_POOLINGS.items() if all(p in shapes for p in ps)]
        raise CacheNotFoundError(
            f"Pooling {pooling!r} is not stored in {self.layout.uri}; stored: {list(shapes)}"
            + (f", derived: {derivable}" if derivable else "")
            + ". Re-extract with that pooling to add it."
        )

    def row_of(self, image_id: str) -> int:
        return self._row_lookup()[image_id]

    def _row_lookup(self) -> dict[str, int]:
        if self._row_of is None:
            self._row_of = {i: r for r, i in enumerate(self.layout.ids)}
        return self._row_of

    def select(self, ids: Sequence[str] | None, rows: np.ndarray | slice | None) -> Selection:
        """Rows to read: a unit-step slice, or row numbers in the order asked for."""
        n_images = self.layout.n_images
        if ids is not None and rows is not None:
            raise ValueError("Pass either ids= or rows=, not both.")
        if ids is not None:
            lookup = self._row_lookup()
            missing = [i for i in ids if i not in lookup]
            if missing:
                raise CacheNotFoundError(
                    f"{len(missing)} of {len(ids)} requested ids are not in {self.layout.uri}: "
                    f"{fmt_ids(missing)}. The entry was extracted for another image list."
                )
            return np.fromiter((lookup[i] for i in ids), dtype=np.int64, count=len(ids))
        if rows is None:
            return slice(0, n_images)
        if isinstance(rows, slice):
            start, stop, step = rows.indices(n_images)
            if step == 1:
                return slice(start, max(start, stop))
            return np.arange(start, stop, step, dtype=np.int64)
        idx = np.asarray(rows)
        if idx.dtype == np.bool_:
            if idx.shape != (n_images,):
                raise IndexError(f"Expected a bool mask of shape ({n_images},).")
            return np.flatnonzero(idx)
        idx = idx.astype(np.int64, copy=False).reshape(-1)
        if idx.size and (idx.min() < -n_images or idx.max() >= n_images):
            raise IndexError(f"Row index out of range for {n_images} rows.")
        return np.where(idx < 0, idx + n_images, idx)

    def read_into(
        self, arr: zarr.Array[Any], sel: Selection, out: np.ndarray, *, verify: bool | None = None
    ) -> None:
        """Fill ``out`` with rows ``sel`` of ``arr``, checked unless ``verify`` (default: the
        reader's) is False; damage raises :class:`IntegrityError` naming the repair."""
        if self.verify if verify is None else verify:
            self._read_checked(arr, sel, out)
        else:
            self._raw_read(arr, sel, out, None)

    def _read_chunks_into(self, arr: zarr.Array[Any], sel: Selection, out: np.ndarray) -> None:
        layout = self.layout.chunk_layout(arr.path) if isinstance(sel, slice) else None
        if layout is not None and isinstance(sel, slice):
            layout.read_rows(sel.start, sel.stop, out)
            return
        unit_rows = self.layout.unit_rows
        if out.dtype != arr.dtype:  # cast chunk by chunk: memory stays one chunk
            if isinstance(sel, slice):
                for s in range(sel.start, sel.stop, unit_rows):
                    e = min(s + unit_rows, sel.stop)
                    out[s - sel.start : e - sel.start] = arr[s:e]
            else:
                for s in range(0, len(sel), unit_rows):
                    part = sel[s : s + unit_rows]
                    out[s : s + len(part)] = arr.get_orthogonal_selection((part,))
            return
        buf = NDBuffer.from_numpy_array(out)
        if isinstance(sel, slice):
            arr.get_basic_selection(sel, out=buf)
        elif len(sel):
            arr.get_orthogonal_selection((sel,), out=buf)

    def read_rows_of(
        self, name: str, start: int, stop: int, *, verify: bool | None = None
    ) -> np.ndarray:
        """Rows ``[start, stop)`` of array ``name`` in its stored dtype."""
        arr = self.layout.array(name)
        data = np.empty((stop - start, *arr.shape[1:]), dtype=arr.dtype)
        self.read_into(arr, slice(start, stop), data, verify=verify)
        return data

    def _note_use(self) -> None:
        """A reader marks the entry as used (at most once per object and once a day)."""
        lay = self.layout
        if not self._use_noted and not lay.writable:
            self._use_noted = True
            if lay.is_complete:
                lay.root.touch(
                    f"{lay.relpath}/{LAST_USED_FILE}", min_interval_s=LAST_USED_INTERVAL_S
                )

    def read(
        self,
        pooling: str,
        *,
        ids: Sequence[str] | None = None,
        rows: np.ndarray | slice | None = None,
        out_dtype: Any = None,
        verify: bool | None = None,
    ) -> np.ndarray:
        """See :meth:`embedkit.store.entry.FeatureEntry.read`."""
        lay = self.layout
        parts = self.components(pooling)
        sel = self.select(ids, rows)
        self._note_use()
        n = (sel.stop - sel.start) if isinstance(sel, slice) else len(sel)
        if len(parts) == 1:
            dtype = np.dtype(out_dtype) if out_dtype is not None else lay.dtypes[parts[0]]
            out = np.empty((n, *lay.shapes[parts[0]]), dtype=dtype)
            self.read_into(lay.feature(parts[0]), sel, out, verify=verify)
            return out
        for p in parts:
            if len(lay.shapes[p]) != 1:
                raise ValueError(f"Derived pooling {pooling!r} needs 1-D parts; {p} is not.")
        dtype = (
            np.dtype(out_dtype)
            if out_dtype is not None
            else np.result_type(*(lay.dtypes[p] for p in parts))
        )
        width = sum(lay.shapes[p][0] for p in parts)
        out = np.empty((n, width), dtype=dtype)
        offset = 0
        for p in parts:
            d = lay.shapes[p][0]
            self.read_into(lay.feature(p), sel, out[:, offset : offset + d], verify=verify)
            offset += d
        return out

    def valid_mask(self, *, verify: bool | None = None) -> np.ndarray:
        """(N,) bool: False for images skipped as unreadable (and for unwritten units)."""
        lay = self.layout
        arr = lay.array(VALID_ARRAY)
        out = np.zeros(lay.n_images, dtype=bool)
        complete = lay.is_complete
        for u in range(lay.n_units):
            if not complete and self.record(u) is None:
                continue  # not written yet: no valid rows
            s, e = lay.unit_bounds(u)
            self.read_into(arr, slice(s, e), out[s:e], verify=verify)
        return out

    def skipped(self) -> list[tuple[str, str]]:
        """``(image_id, reason)`` of every skipped image written so far."""
        lay = self.layout
        done = lay.completion()
        if done is not None:
            return [(str(i), str(r)) for i, r in done["skipped"]]
        out: list[tuple[str, str]] = []
        for u in sorted(lay.done_units()):
            out.extend((str(i), str(r)) for i, r in lay.unit_record(u)["skipped"])
        return out
