"""A loaded dataset: ids, paths, patients, labels and splits, row-aligned."""

from __future__ import annotations

import hashlib
import os
import posixpath
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from embedkit.errors import ManifestError, did_you_mean
from embedkit.manifest.index import IndexFrame, read_index
from embedkit.manifest.labels import Labels, build_labels
from embedkit.manifest.schema import (
    MASK_COLUMN,
    SPLIT_NAMES,
    ColumnsLabels,
    DatasetConfig,
    GivenSplits,
)
from embedkit.manifest.splits import assign_splits

if TYPE_CHECKING:
    from embedkit.data.volumes import VolumeSlice


@dataclass(frozen=True, eq=False)
class DatasetTable:
    """One row per image, in index order after filters.

    For a volume dataset (``volumes:`` in the manifest) one row per slice: ``ids`` are
    ``<volume id>/<slice index>``, ``paths`` the file holding each slice (the NIfTI file, the
    series' file of that slice), ``volume_slices`` what to read
    (:class:`~embedkit.data.volumes.VolumeSlice` s), ``volumes`` and ``slices`` each row's volume
    id and slice index, and ``reading`` how volumes become slices (it enters the cache key with
    the preprocessing). Read images through :attr:`sources`, which serves both kinds.
    """

    name: str
    ids: tuple[str, ...]
    paths: tuple[Path, ...]
    patients: tuple[str, ...]
    labels: Labels
    split: np.ndarray
    has_patients: bool = True
    notes: tuple[str, ...] = field(default=())
    volumes: tuple[str, ...] | None = None
    slices: tuple[int, ...] | None = None
    reading: Mapping[str, Any] = field(default_factory=dict)
    volume_slices: tuple[VolumeSlice, ...] | None = None
    # Segmentation datasets (``classes:`` in the manifest): label-map classes (id 0 the
    # background) and one label-map path per row.
    classes: tuple[str, ...] | None = None
    masks: tuple[Path, ...] | None = None

    def __post_init__(self) -> None:
        n = len(self.ids)
        sizes = {len(self.paths), len(self.patients), len(self.labels), len(self.split)}
        if sizes != {n}:
            raise ValueError(f"DatasetTable columns differ in length: {sorted(sizes | {n})}")

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def sources(self) -> tuple[os.PathLike[str], ...]:
        """What to read for each row: the image files, or the slices of a volume dataset."""
        return self.paths if self.volume_slices is None else self.volume_slices

    def indices(self, split: str) -> np.ndarray:
        """Row indices (int64, index order) of ``split``: 'train', 'val' or 'test'."""
        if split not in SPLIT_NAMES:
            raise ManifestError(
                f"unknown split {split!r}{did_you_mean(split, SPLIT_NAMES) or '.'} "
                f"Splits: {', '.join(SPLIT_NAMES)}"
            )
        return np.flatnonzero(self.split == split).astype(np.int64)

    @cached_property
    def splits_digest(self) -> str:
        """SHA-256 of exactly what a probe or finetuning run learns and is scored on: for each
        split, its image ids in order, their targets and label masks, with the label names and
        task. A changed label, split, filter or uncertainty policy changes it; a result record's
        identity includes it, so a stale record is never returned for changed data."""
        h = hashlib.sha256()
        h.update(f"{self.labels.kind}\0{chr(31).join(self.labels.names)}\n".encode())
        for split in SPLIT_NAMES:
            rows = self.indices(split)
            h.update(f"{split}\0{len(rows)}\n".encode())
            h.update("\0".join(self.ids[i] for i in rows).encode())
            h.update(np.ascontiguousarray(self.labels.y[rows]).tobytes())
            h.update(np.ascontiguousarray(self.labels.mask[rows], dtype=bool).tobytes())
        if self.classes is not None and self.masks is not None:
            h.update(f"classes\0{chr(31).join(self.classes)}\n".encode())
            base = os.path.commonpath(self.masks) if len(self.masks) > 1 else ""
            h.update("\0".join(os.path.relpath(m, base or m.parent) for m in self.masks).encode())
        return h.hexdigest()

    @cached_property
    def _row_of(self) -> pd.Index:
        return pd.Index(self.ids)

    def rows_for_ids(self, ids: Sequence[str]) -> np.ndarray:
        """Row indices of ``ids``, in their order; ids not in the table raise ``ManifestError``."""
        rows: np.ndarray = self._row_of.get_indexer(list(ids)).astype(np.int64)
        missing = [i for i, row in zip(ids, rows, strict=True) if row < 0]
        if missing:
            raise ManifestError(
                f"dataset {self.name!r}: {len(missing)} of {len(rows)} ids are not in the "
                f"table (first: {', '.join(map(repr, missing[:5]))}); they may have been "
                "removed by filters or come from another dataset"
            )
        return rows


def load_table(config: DatasetConfig) -> DatasetTable:
    """Read ``config.index``, apply filters, build labels and splits."""
    index = read_index(config.index, _columns_used(config))
    if index.frame.empty:
        raise ManifestError(f"{config.index}: the index has no rows")
    all_ids = index.frame[config.id_column].dropna()
    index = _apply_filters(config, index)
    frame = index.frame

    ids = frame[config.id_column]
    _no_blanks(index, ids, config.id_column, "id_column")
    duplicated = ids.duplicated(keep=False)
    if duplicated.any():
        dupes = ids[duplicated].unique()
        raise ManifestError(
            f"{config.index.name}: {len(dupes)} image ids appear more than once (first: "
            f"{', '.join(map(repr, dupes[:5]))}; {index.rows(ids.index[duplicated.to_numpy()])}). "
            f"Image ids in {config.id_column!r} must be unique; drop the repeats or pick "
            "another id_column"
        )
    paths = _paths(config, index)
    if config.patient_column is not None:
        patient_cells = frame[config.patient_column]
        _no_blanks(index, patient_cells, config.patient_column, "patient_column")
        patients = patient_cells.to_numpy(dtype=str)
    else:
        patients = ids.to_numpy(dtype=str)
    id_array = ids.to_numpy(dtype=str)
    labels = build_labels(config.labels, index)
    split, notes = assign_splits(
        config.splits, index, ids=id_array, patients=patients, all_ids=set(all_ids)
    )
    table = DatasetTable(
        name=config.name,
        ids=tuple(id_array.tolist()),
        paths=paths,
        patients=tuple(patients.tolist()),
        labels=labels,
        split=split,
        has_patients=config.patient_column is not None,
        notes=notes,
        classes=config.classes,
        masks=None if config.classes is None else _paths(config, index, MASK_COLUMN, "classes"),
    )
    if config.volumes is None:
        return table
    from embedkit.manifest.slices import slice_table

    return slice_table(table, config.volumes, index, frame.index.to_numpy())


def _columns_used(config: DatasetConfig) -> dict[str, str]:
    """Column → the manifest field naming it (for 'no column' messages)."""
    used = {config.id_column: "id_column", config.path_column_name: "path_column"}
    if config.patient_column is not None:
        used[config.patient_column] = "patient_column"
    for column in config.filters:
        used.setdefault(column, "filters")
    spec = config.labels
    if spec is not None:
        for column in spec.columns if isinstance(spec, ColumnsLabels) else (spec.column,):
            used.setdefault(column, "labels")
    if isinstance(config.splits, GivenSplits):
        used.setdefault(config.splits.column, "splits.column")
    if config.classes is not None:
        used.setdefault(MASK_COLUMN, "classes (label-map paths)")
    return used


def _apply_filters(config: DatasetConfig, index: IndexFrame) -> IndexFrame:
    frame = index.frame
    keep = np.ones(len(frame), dtype=bool)
    for column, allowed in config.filters.items():
        keep &= frame[column].isin(allowed).to_numpy()
    if keep.all():
        return index
    if not keep.any():
        lines = []
        for column, allowed in config.filters.items():
            present = frame[column].dropna().unique().tolist()
            seen = ", ".join(repr(v) for v in sorted(present)[:10])
            hints = "".join(_suggest_value(a, present) for a in allowed if a not in present)
            lines.append(f"  {column!r}: filter keeps {list(allowed)}; the index has {seen}{hints}")
        raise ManifestError(
            f"{config.index.name}: the filters remove all {len(frame)} rows:\n" + "\n".join(lines)
        )
    return IndexFrame(path=index.path, frame=frame[keep])


def _suggest_value(value: str, present: list[str]) -> str:
    """did-you-mean for a filter value, also catching case slips ('pa' for 'PA')."""
    same_case = [p for p in present if p.lower() == value.lower()]
    return f"; did you mean {same_case[0]!r}?" if same_case else did_you_mean(value, present)


def _no_blanks(index: IndexFrame, cells: pd.Series, column: str, field_name: str) -> None:
    blank = cells.isna()
    if blank.any():
        raise ManifestError(
            f"{index.rows(cells.index[blank.to_numpy()])}: empty {column!r} cell "
            f"({field_name}); every row needs one"
        )


def _paths(
    config: DatasetConfig,
    index: IndexFrame,
    column: str | None = None,
    field_name: str = "path_column",
) -> tuple[Path, ...]:
    column = column or config.path_column_name
    cells = index.frame[column]
    _no_blanks(index, cells, column, field_name)
    absolute = cells.str.startswith(("/", "\\")) | cells.str.match(r"[A-Za-z]:[\\/]")
    escapes = absolute.to_numpy().copy()
    maybe_up = np.flatnonzero(cells.str.contains("..", regex=False).to_numpy())
    for i in maybe_up:
        parts = posixpath.normpath(str(cells.iloc[i]).replace("\\", "/")).split("/")
        escapes[i] |= parts[0] == ".."
    if escapes.any():
        where = np.flatnonzero(escapes)
        source = cells.index.to_numpy()
        raise ManifestError(
            f"{index.row(source[where[0]])}: path {cells.iloc[where[0]]!r} in {column!r} is "
            f"not inside the images root {config.images} ({where.size} such rows: "
            f"{index.rows(source[where])}). Paths must be relative to `images` without '..'; "
            "point `images` at a common parent folder instead"
        )
    return tuple(map(config.images.joinpath, cells.tolist()))
