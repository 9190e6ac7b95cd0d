"""Row reuse within a feature space: copy what a complete entry already holds.

Entries whose keys agree on everything but the image list (:meth:`CacheKey.feature_space`)
hold the same features for the same image bytes. When a new entry is extracted,
:func:`plan_reuse` finds, for every image, a complete entry of its feature space in the same root
holding that image id with the same content fingerprint (stored per row in the unit records,
:data:`RECORD_FINGERPRINTS`), and the image's row is copied from there instead of computed.
Rows a source skipped as unreadable are never copied (they are computed, and fail or are
skipped again by the bad-image policy).

The plan is deterministic for a given list of sources, which the new entry records in its
provenance when it is created (:meth:`ReusePlan.provenance`); a resumed extraction plans
against that same list (a source removed meanwhile only turns its rows into computed ones),
so an interrupted entry resumes to the same plan and the same bytes.

Copied rows go through the writer exactly like computed ones (:class:`RowCopier` fills a
unit's arrays; ``FeatureEntry.begin_unit`` writes, checksums and records them); each unit
record lists its copied rows per source (:data:`RECORD_COPIED`:
``{digest: [[dst_row, src_row, n_rows], ...]}``). Copies are exact: the stored values are read
(checked against the source's checksums) and written back in the same dtype.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from embedkit.errors import CacheNotFoundError, IncompleteEntryError
from embedkit.store.catalog import list_entries
from embedkit.store.entry import FeatureEntry
from embedkit.store.key import CacheKey
from embedkit.store.root import CacheRoot

__all__ = [
    "RECORD_COPIED",
    "RECORD_FINGERPRINTS",
    "ReusePlan",
    "ReuseSource",
    "RowCopier",
    "feature_space_sources",
    "plan_reuse",
    "row_runs",
]

#: Unit-record field: the content fingerprint of each row's image (what reuse matches on).
RECORD_FINGERPRINTS = "fingerprints"
#: Unit-record field: ``{source digest: [[dst_row, src_row, n_rows], ...]}`` of copied rows.
RECORD_COPIED = "copied"
#: Fingerprints that never match (a file that could not be read when planning).
_NEVER = frozenset({"missing"})


@dataclass(frozen=True, slots=True)
class ReuseSource:
    """A complete entry rows are copied from."""

    relpath: str
    digest: str


@dataclass(frozen=True, slots=True)
class ReusePlan:
    """Where each row of a new entry comes from: ``source_of[r]`` indexes :attr:`sources`
    (-1: computed) and ``row_of[r]`` is the row in that source."""

    sources: tuple[ReuseSource, ...]
    source_of: np.ndarray
    row_of: np.ndarray

    @classmethod
    def compute_all(cls, n_images: int) -> ReusePlan:
        return cls((), np.full(n_images, -1, dtype=np.int32), np.zeros(n_images, dtype=np.int64))

    @property
    def n_copied(self) -> int:
        return int((self.source_of >= 0).sum())

    @property
    def n_computed(self) -> int:
        return int((self.source_of < 0).sum())

    def compute_rows(self, start: int, stop: int) -> list[int]:
        """Rows in ``[start, stop)`` that the encoder must compute."""
        return [start + int(i) for i in np.flatnonzero(self.source_of[start:stop] < 0)]

    def copied_in(self, start: int, stop: int) -> int:
        return int((self.source_of[start:stop] >= 0).sum())

    def is_copy_unit(self, start: int, stop: int) -> bool:
        """Whether every row of ``[start, stop)`` is copied (no forward pass at all)."""
        return bool((self.source_of[start:stop] >= 0).all())

    def provenance(self) -> dict[str, Any]:
        """What the new entry records about its reuse (``provenance["reuse"]``)."""
        counts = np.bincount(self.source_of[self.source_of >= 0], minlength=len(self.sources))
        return {
            "sources": [
                {"relpath": s.relpath, "digest": s.digest, "rows": int(n)}
                for s, n in zip(self.sources, counts, strict=True)
            ],
            "rows_copied": self.n_copied,
            "rows_computed": self.n_computed,
        }


def row_runs(dst: np.ndarray, src: np.ndarray) -> list[tuple[int, int, int]]:
    """``(dst_start, src_start, n)`` runs where both row lists advance by one together."""
    if len(dst) == 0:
        return []
    breaks = np.flatnonzero((np.diff(dst) != 1) | (np.diff(src) != 1)) + 1
    starts = np.concatenate([[0], breaks])
    stops = np.concatenate([breaks, [len(dst)]])
    return [(int(dst[a]), int(src[a]), int(b - a)) for a, b in zip(starts, stops, strict=True)]


def feature_space_sources(root: CacheRoot, key: CacheKey) -> list[str]:
    """Relative paths of the complete entries under ``root`` in ``key``'s feature space (the
    entry of ``key`` itself left out), largest first, then by path."""
    space = key.feature_space()
    own = key.relpath()
    found = [
        s
        for s in list_entries(root, model=key.model)
        if s.complete and s.relpath != own and s.feature_space == space
    ]
    found.sort(key=lambda s: (-s.n_images, s.relpath))
    return [s.relpath for s in found]


def _open_source(
    root: CacheRoot, relpath: str, key: CacheKey, shapes: Mapping[str, tuple[int, ...]]
) -> FeatureEntry | None:
    try:
        src = FeatureEntry.open(root, relpath)
    except (CacheNotFoundError, IncompleteEntryError):
        return None  # removed (gc) or never completed since it was chosen
    if src.key.feature_space() != key.feature_space() or src.shapes != dict(shapes):
        return None
    return src


def plan_reuse(
    root: CacheRoot,
    key: CacheKey,
    ids: Sequence[str],
    fingerprints: Sequence[str],
    shapes: Mapping[str, tuple[int, ...]],
    *,
    sources: Sequence[str] | None = None,
) -> ReusePlan:
    """Which rows of the entry of ``key`` (images ``ids`` with ``fingerprints``) to copy, and
    from where.

    ``sources``: the entries to consider, in order of preference (a resumed entry passes the
    list it recorded); default: :func:`feature_space_sources`. Each row is taken from the first
    source holding its id with an equal fingerprint and a valid (not skipped) row. Sources
    that vanished or no longer match the feature space are left out.
    """
    n = len(ids)
    if len(fingerprints) != n:
        raise ValueError(f"Expected one fingerprint per id, got {len(fingerprints)} for {n}.")
    wanted: dict[str, int] = {
        image_id: r for r, (image_id, fp) in enumerate(zip(ids, fingerprints, strict=True))
        if fp not in _NEVER
    }  # fmt: skip
    source_of = np.full(n, -1, dtype=np.int32)
    row_of = np.zeros(n, dtype=np.int64)
    chosen: list[ReuseSource] = []
    names = feature_space_sources(root, key) if sources is None else list(sources)
    for relpath in names:
        if not wanted:
            break
        src = _open_source(root, relpath, key, shapes)
        if src is None:
            continue
        index = len(chosen)
        hits = 0
        src_ids = src.ids
        for u in range(src.n_units):
            start, stop = src.unit_bounds(u)
            if not any(i in wanted for i in src_ids[start:stop]):
                continue
            record = src.unit_record(u)
            fps = record.get(RECORD_FINGERPRINTS)
            if not isinstance(fps, list) or len(fps) != stop - start:
                continue  # written before fingerprints were recorded: not reusable
            skipped = {str(s[0]) for s in record.get("skipped", [])}
            for offset, image_id in enumerate(src_ids[start:stop]):
                r = wanted.get(image_id)
                if r is None or fps[offset] != fingerprints[r] or image_id in skipped:
                    continue
                source_of[r] = index
                row_of[r] = start + offset
                del wanted[image_id]
                hits += 1
        if hits:
            chosen.append(ReuseSource(relpath, src.key.digest()))
    return ReusePlan(tuple(chosen), source_of, row_of)


class RowCopier:
    """Reads the copied rows of a new entry's units from their sources (each opened once, every
    read checked against the source's unit checksums)."""

    def __init__(self, root: CacheRoot, plan: ReusePlan) -> None:
        self.root = root
        self.plan = plan
        self._open: dict[int, FeatureEntry] = {}

    def source(self, index: int) -> FeatureEntry:
        entry = self._open.get(index)
        if entry is None:
            relpath = self.plan.sources[index].relpath
            try:
                entry = FeatureEntry.open(self.root, relpath)
            except (CacheNotFoundError, IncompleteEntryError) as exc:
                raise CacheNotFoundError(
                    f"{self.root.url(relpath)}, which this extraction copies rows from, is "
                    "gone; rerun the same command: the rows it held are then computed."
                ) from exc
            self._open[index] = entry
        return entry

    def fill(self, start: int, stop: int, arrays: Mapping[str, np.ndarray]) -> dict[str, Any]:
        """Write the copied rows of ``[start, stop)`` into ``arrays`` (pooling -> rows of the
        unit, any float dtype); returns the unit record's :data:`RECORD_COPIED` field."""
        plan = self.plan
        src_of = plan.source_of[start:stop]
        copied: dict[str, list[list[int]]] = {}
        for index in np.unique(src_of[src_of >= 0]):
            local = np.flatnonzero(src_of == index)
            src = self.source(int(index))
            runs = row_runs(local, plan.row_of[start:stop][local])
            for name, out in arrays.items():
                arr = src.layout.feature(name)
                for dst, first, n in runs:
                    part = out[dst : dst + n]
                    if part.dtype == arr.dtype:
                        src.reader.read_into(arr, slice(first, first + n), part)
                    else:
                        part[...] = src.reader.read_rows_of(arr.path, first, first + n)
            copied[plan.sources[int(index)].digest] = [[start + d, s, n] for d, s, n in runs]
        return copied

    def unit_arrays(
        self,
        start: int,
        stop: int,
        shapes: Mapping[str, tuple[int, ...]],
        dtypes: Mapping[str, np.dtype[Any]],
    ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """The arrays of a unit whose rows are all copied, in the stored dtypes, and its
        :data:`RECORD_COPIED` field."""
        arrays = {p: np.empty((stop - start, *shapes[p]), dtype=dtypes[p]) for p in shapes}
        return arrays, self.fill(start, stop, arrays)
