"""Reading a feature cache entry: poolings (stored or derived), rows by id, whole arrays.

On local roots full-range reads are served by :mod:`embedkit.store.chunkio` straight into a
preallocated output (chunks in parallel); zarr-python serves fsspec roots and row-index reads,
chunk by chunk when the output dtype differs, so memory stays one chunk beyond the output.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import zarr
from zarr.core.buffer.cpu import NDBuffer

from embedkit.errors import CacheNotFoundError, IntegrityError
from embedkit.store.layout import (
    DERIVED_POOLINGS,
    LAST_USED_FILE,
    LAST_USED_INTERVAL_S,
    EntryLayout,
    fmt_ids,
)

__all__ = ["EntryReader"]

Selection = slice | np.ndarray


class EntryReader:
    """Reads the arrays of one entry (opened for reading or writing)."""

    def __init__(self, layout: EntryLayout) -> None:
        self.layout = layout
        self._row_of: dict[str, int] | None = None
        self._use_noted = False

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

    def read_into(self, arr: zarr.Array[Any], sel: Selection, out: np.ndarray) -> None:
        """Fill ``out`` with rows ``sel`` of ``arr``; a chunk that fails to decode raises
        :class:`IntegrityError` naming the repair."""
        try:
            self._read_chunks_into(arr, sel, out)
        except RuntimeError as exc:  # the codec of a damaged chunk (e.g. zstd) fails to decode
            raise IntegrityError(
                f"{self.layout.uri}: {arr.path} cannot be decoded ({exc}); the entry is damaged. "
                "Run `embedkit cache verify` to see which units, then re-extract with --overwrite."
            ) from exc

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

    def read_rows_of(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows ``[start, stop)`` of array ``name`` in its stored dtype."""
        arr = self.layout.array(name)
        data = np.empty((stop - start, *arr.shape[1:]), dtype=arr.dtype)
        self.read_into(arr, slice(start, stop), data)
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
            self.read_into(lay.feature(parts[0]), sel, out)
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
            self.read_into(lay.feature(p), sel, out[:, offset : offset + d])
            offset += d
        return out

    def valid_mask(self) -> np.ndarray:
        """(N,) bool: False for images skipped as unreadable (and for unwritten units)."""
        return np.asarray(self.layout.array("valid")[:], dtype=bool)

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
