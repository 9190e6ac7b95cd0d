"""Train / val / test assignment: from a column (given), by patient (seeded), or from id files."""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path

import numpy as np
import pandas as pd

from embedkit.errors import ManifestError
from embedkit.manifest.index import IndexFrame
from embedkit.manifest.schema import (
    SPLIT_NAMES,
    FilesSplits,
    Fractions,
    GivenSplits,
    PatientSplits,
    SplitsConfig,
)

SPLIT_DTYPE = "<U5"


def assign_splits(
    spec: SplitsConfig,
    index: IndexFrame,
    *,
    ids: np.ndarray,
    patients: np.ndarray,
    all_ids: Collection[str],
) -> tuple[np.ndarray, tuple[str, ...]]:
    """The split of each row, and notes for the check report.

    ``all_ids`` are the ids of the index before filters: a split file may name ids the filters
    removed (an official list that includes lateral views, say) and those are left out quietly.
    """
    match spec:
        case PatientSplits():
            return patient_split(patients, spec.fractions, spec.seed), ()
        case GivenSplits():
            return _given(spec, index), ()
        case FilesSplits():
            return _files(spec, ids, all_ids)
    raise TypeError(f"unknown splits spec {type(spec).__name__}")  # pragma: no cover


def patient_split(patients: np.ndarray, fractions: Fractions, seed: int) -> np.ndarray:
    """Assign whole patients to splits so that image counts approach ``fractions``.

    The unique patient ids are sorted, then permuted by ``np.random.default_rng(seed)``; walking
    that order, each patient's images fill a stretch of the cumulative image count, and the patient
    goes to the split whose share contains the middle of its stretch (train covers
    ``[0, train·N)``, val ``[train·N, (train+val)·N)``, test the rest). Counting images rather than
    patients keeps the shares right when some patients have many images. The result depends only
    on the set of (patient, image count) pairs and the seed, not on row order.
    """
    unique, inverse, counts = np.unique(
        np.asarray(patients, dtype=str), return_inverse=True, return_counts=True
    )
    order = np.random.default_rng(seed).permutation(len(unique))
    stretch = counts[order].astype(np.float64)
    middle = np.cumsum(stretch) - stretch / 2
    total = fractions.train + fractions.val + fractions.test
    bounds = np.array([fractions.train, fractions.train + fractions.val]) / total * stretch.sum()
    split_of = np.empty(len(unique), dtype=np.int64)
    split_of[order] = np.searchsorted(bounds, middle, side="right")
    return np.array(SPLIT_NAMES, dtype=SPLIT_DTYPE)[split_of[inverse]]


def _given(spec: GivenSplits, index: IndexFrame) -> np.ndarray:
    cells = index.frame[spec.column]
    lookup = spec.values.lookup()
    split = cells.map(lookup)
    unmapped = split.isna()
    if unmapped.any():
        counts = cells[unmapped].fillna("<blank>").value_counts()
        found = ", ".join(f"{value!r} ({count} rows)" for value, count in counts.head(10).items())
        raise ManifestError(
            f"{index.rows(cells.index[unmapped.to_numpy()])}: split column {spec.column!r} "
            f"holds values that splits.values does not map: {found}. Map them under "
            f"splits.values (now {lookup}) or filter those rows out."
        )
    values: np.ndarray = split.to_numpy(dtype=SPLIT_DTYPE)
    return values


def _read_ids(path: Path, split: str) -> list[str]:
    if not path.is_file():
        raise ManifestError(f"{path}: split file for {split!r} not found; check splits.{split}")
    lines = path.read_text(encoding="utf-8-sig").splitlines()
    ids = [line.strip() for line in lines if line.strip()]
    dupes = pd.Index(ids)[pd.Index(ids).duplicated()].unique()
    if len(dupes):
        raise ManifestError(
            f"{path}: {len(dupes)} ids are listed more than once (first: "
            f"{', '.join(map(repr, dupes[:5]))}); list each id once"
        )
    return ids


def _files(
    spec: FilesSplits, ids: np.ndarray, all_ids: Collection[str]
) -> tuple[np.ndarray, tuple[str, ...]]:
    row_of = pd.Index(ids)
    split = np.full(len(ids), "", dtype=SPLIT_DTYPE)
    owner: dict[str, str] = {}
    notes: list[str] = []
    all_index = pd.Index(list(all_ids))
    for name, path in spec.files().items():
        listed = _read_ids(path, name)
        clash = [i for i in listed if i in owner]
        if clash:
            other = owner[clash[0]]
            raise ManifestError(
                f"{path}: {len(clash)} ids are also in the {other!r} split file "
                f"(first: {', '.join(map(repr, clash[:5]))}); an image belongs to one split"
            )
        owner.update(dict.fromkeys(listed, name))
        positions = row_of.get_indexer(listed)
        absent = np.asarray(listed, dtype=object)[positions < 0]
        if absent.size:
            unknown = absent[all_index.get_indexer(absent) < 0]
            if unknown.size:
                raise ManifestError(
                    f"{path}: {unknown.size} of {len(listed)} ids are not in the index "
                    f"(first: {', '.join(map(repr, unknown[:5]))}); fix the split file or the "
                    "index"
                )
            notes.append(f"{absent.size} ids of the {name!r} split file were removed by filters")
        split[positions[positions >= 0]] = name
    unassigned = int((split == "").sum())
    if unassigned:
        notes.append(f"{unassigned} images are in no split file (split '')")
    return split, tuple(notes)
