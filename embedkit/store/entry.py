"""One feature cache entry: a Zarr v3 group written unit by unit, resumable, verified.

:class:`FeatureEntry` is the public face of an entry; the work is done by parts sharing one
:class:`~embedkit.store.layout.EntryLayout` (the on-disk layout and the facts of its attrs):

* :mod:`embedkit.store.writer`: creating the layout (once, under a claim), writing units
  (``begin_unit`` / ``PendingUnit.commit``), ``finalize`` (COMPLETE.json), crash safety;
* :mod:`embedkit.store.reader`: poolings (stored and derived), rows by id or index;
* :mod:`embedkit.store.verify`: checking every unit against its record.

See :mod:`embedkit.store.layout` for the files of an entry.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import filelock
import numpy as np

from embedkit.errors import CacheNotFoundError, CacheWriteError, IncompleteEntryError
from embedkit.store.key import CacheKey
from embedkit.store.layout import (
    DERIVED_POOLINGS,
    LAST_USED_FILE,
    EntryLayout,
    entry_relpaths,
    existing_attrs,
    resolve_entry,
)
from embedkit.store.lease import live_claims
from embedkit.store.reader import EntryReader
from embedkit.store.root import CacheRoot
from embedkit.store.verify import check_unit, damaged_units, verify_entry
from embedkit.store.writer import (
    COMPRESSIONS,
    Compression,
    EntryWriter,
    PendingUnit,
    create_or_open_layout,
)

__all__ = [
    "COMPRESSIONS",
    "DERIVED_POOLINGS",
    "LAST_USED_FILE",
    "Compression",
    "FeatureEntry",
    "PendingUnit",
    "entry_relpaths",
    "remove_entry",
    "resolve_entry",
]


class FeatureEntry:
    """A feature cache entry. Build it with :meth:`create_or_open` (writers) or :meth:`open`."""

    def __init__(
        self, root: CacheRoot, relpath: str, attrs: Mapping[str, Any], *, writable: bool
    ) -> None:
        self._attach(EntryLayout(root, relpath, attrs, writable=writable))

    def _attach(self, layout: EntryLayout) -> None:
        #: The entry's layout and facts, shared by its reader and writer.
        self.layout = layout
        self.reader = EntryReader(layout)
        self._writer = EntryWriter(layout)

    @classmethod
    def _of(cls, layout: EntryLayout) -> FeatureEntry:
        entry = cls.__new__(cls)
        entry._attach(layout)
        return entry

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
        return cls._of(
            create_or_open_layout(
                root,
                key,
                ids=ids,
                shapes=shapes,
                unit_rows=unit_rows,
                provenance=provenance,
                compression=compression,
                lease_ttl_s=lease_ttl_s,
            )
        )

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
        attrs = existing_attrs(root, relpath)
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

    @classmethod
    def open_for_repair(
        cls, root: CacheRoot, key_or_relpath_or_digest: CacheKey | str
    ) -> FeatureEntry:
        """Open a complete entry writable, for ``embedkit cache repair`` only: the one way a
        completed entry changes is :meth:`reopen_unit` + rewriting that unit's rows."""
        root.require_writable("repair an entry in")
        relpath = resolve_entry(root, key_or_relpath_or_digest)
        attrs = existing_attrs(root, relpath)
        if attrs is None:
            raise CacheNotFoundError(
                f"No readable cache entry at {root.url(relpath)} (its zarr.json is missing or "
                "damaged): repair needs it; re-extract with --overwrite."
            )
        entry = cls(root, relpath, attrs, writable=True)
        if not entry.is_complete:
            raise IncompleteEntryError(
                f"{entry.uri} is incomplete; rerun the same `embedkit extract` command to "
                "finish it (repair is for complete entries)."
            )
        return entry

    # ---- basic facts --------------------------------------------------------------------

    @property
    def root(self) -> CacheRoot:
        return self.layout.root

    @property
    def relpath(self) -> str:
        return self.layout.relpath

    @property
    def key(self) -> CacheKey:
        return self.layout.key

    @property
    def unit_rows(self) -> int:
        return self.layout.unit_rows

    @property
    def n_units(self) -> int:
        return self.layout.n_units

    @property
    def n_images(self) -> int:
        return self.layout.n_images

    @property
    def attrs(self) -> dict[str, Any]:
        return self.layout.attrs

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Per-image shape of each stored pooling."""
        return self.layout.shapes

    @property
    def dtypes(self) -> dict[str, np.dtype[Any]]:
        """Stored dtype of each stored pooling."""
        return self.layout.dtypes

    @property
    def uri(self) -> str:
        """Absolute path or URL of the entry."""
        return self.layout.uri

    path = uri

    @property
    def poolings(self) -> tuple[str, ...]:
        return tuple(self.layout.shapes)

    @property
    def ids(self) -> tuple[str, ...]:
        return self.layout.ids

    def unit_bounds(self, u: int) -> tuple[int, int]:
        """Rows ``[start, stop)`` of unit ``u``."""
        return self.layout.unit_bounds(u)

    def done_units(self) -> set[int]:
        """Units whose completion record exists."""
        return self.layout.done_units()

    def has_unit(self, u: int) -> bool:
        """Whether unit ``u`` has its completion record (one stat / GET)."""
        return self.root.is_file(self.layout.unit_path(u))

    def pending_units(self) -> list[int]:
        """Units without a completion record, in order."""
        done = self.done_units()
        return [u for u in range(self.n_units) if u not in done]

    def unit_record(self, u: int) -> dict[str, Any]:
        """The completion record of unit ``u``."""
        return self.layout.unit_record(u)

    @property
    def is_complete(self) -> bool:
        return self.layout.is_complete

    def completion(self) -> dict[str, Any] | None:
        """The COMPLETE.json record, or None while incomplete."""
        return self.layout.completion()

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
        self._writer.write_unit(u, arrays, valid=valid, skipped=skipped)

    def begin_unit(
        self,
        u: int,
        arrays: Mapping[str, np.ndarray],
        *,
        valid: np.ndarray,
        skipped: Sequence[tuple[str, str]] = (),
        record_extra: Mapping[str, Any] | None = None,
    ) -> PendingUnit:
        """Start writing unit ``u`` (as :meth:`write_unit`); :meth:`PendingUnit.commit` ends it.

        ``record_extra`` adds fields to the unit's completion record (the extraction stores
        the rows' image fingerprints there, and which rows were copied from which entry).

        On local roots the chunks are written by the pool while this returns, so a writer
        can begin unit ``k + 1`` and then commit unit ``k``: the pool then never waits for
        the caller between units. ``arrays`` must not change until the commit. Arguments and
        an existing record are checked here; NaN/Inf, write errors and a record created by
        another job meanwhile raise from ``commit``, which writes the record only after every
        chunk is written (and synced, with FSYNC).
        """
        return self._writer.begin_unit(
            u, arrays, valid=valid, skipped=skipped, record_extra=record_extra
        )

    def finalize(self, extra: Mapping[str, object] | None = None) -> bool:
        """Create COMPLETE.json once every unit has its record; the entry is then immutable.

        The record is created exclusively in one atomic step (hard link / ``If-None-Match``
        PUT), so of several jobs finishing together exactly one writes it: True for that one,
        False for the others. The claims under ``leases/`` are then removed.
        """
        return self._writer.finalize(extra)

    # ---- reading ------------------------------------------------------------------------

    def row_of(self, image_id: str) -> int:
        return self.reader.row_of(image_id)

    def read(
        self,
        pooling: str,
        *,
        ids: Sequence[str] | None = None,
        rows: np.ndarray | slice | None = None,
        out_dtype: Any = None,
        verify: bool = True,
    ) -> np.ndarray:
        """Features of one pooling (stored or derived, e.g. ``"cls+mean"``).

        All rows by default, or the rows of ``ids`` (in that order) or ``rows``. Only the
        chunks holding those rows are read; the output is allocated once and filled in place.
        The stored dtype is returned unless ``out_dtype`` is given.

        Reads are checked: each unit the read touches is compared with the crc32c of its unit
        record and scanned for NaN/Inf (once per entry object); damage (a flipped byte, a
        missing or truncated chunk, NaN/Inf, a missing record) raises
        :class:`~embedkit.errors.IntegrityError` naming the entry, array, unit, rows and the
        repair command. ``verify=False`` skips the checks: only for data checked already
        (``embedkit cache verify``), and a missing or short chunk still raises.
        """
        return self.reader.read(pooling, ids=ids, rows=rows, out_dtype=out_dtype, verify=verify)

    def read_rows(self, ids: Sequence[str]) -> np.ndarray:
        """Row numbers of ``ids`` in this entry (missing ids raise CacheNotFoundError)."""
        return np.asarray(self.reader.select(ids, None), dtype=np.int64)

    def valid_mask(self, *, verify: bool = True) -> np.ndarray:
        """(N,) bool: False for images skipped as unreadable (and for unwritten units);
        checked like :meth:`read`."""
        return self.reader.valid_mask(verify=verify)

    def skipped(self) -> list[tuple[str, str]]:
        """``(image_id, reason)`` of every skipped image written so far."""
        return self.reader.skipped()

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

    # ---- checking -----------------------------------------------------------------------

    def verify(self) -> list[str]:
        """Re-read everything and return the problems found; ``[]`` means healthy."""
        return verify_entry(self.reader)

    def damaged_units(self) -> dict[int, list[str]]:
        """Units whose data or record is damaged, with the problems (see ``verify``)."""
        return damaged_units(self.reader)

    def reopen_unit(self, u: int) -> None:
        """Remove unit ``u``'s record so the unit can be written again (repair only: the entry
        must be opened with :meth:`open_for_repair`). Until it is rewritten, reads of the unit
        fail as damaged; a repair that stops half way is simply run again."""
        if not self.layout.writable:
            raise CacheWriteError(f"{self.uri} was opened for reading; use open_for_repair.")
        self.layout.unit_bounds(u)
        self.root.remove_tree(self.layout.unit_path(u))
        self.reader = EntryReader(self.layout, verify=self.reader.verify)  # forget checks

    def check_unit(self, u: int, record: Mapping[str, object]) -> list[str]:
        """Problems of unit ``u`` against a unit ``record`` (its own or a source entry's)."""
        return check_unit(self.reader, u, record)


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
