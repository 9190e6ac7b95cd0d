"""Features joined with labels: what probes read from the cache.

:func:`split_features` takes a cache entry and the manifest's dataset table and returns one
split's features, image IDs, targets and label masks, joined by image ID (never by position, so
an entry stays usable when the index is reordered). Images skipped as unreadable at extraction
time are left out, and how many is reported on the result.

For a volume dataset (one row per slice, ``DatasetTable.volumes``), the slice features of each
volume are pooled into one row (``volume_pooling``: the mean or the element-wise max over the
volume's readable slices), so a probe learns and is scored on volume-level labels, one row per
volume with the volume id as its id. A volume none of whose slices could be read is left out.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from embedkit.errors import ProbeInputError
from embedkit.manifest import DatasetTable
from embedkit.probes.backends import nonfinite_rows
from embedkit.probes.request import VolumePooling
from embedkit.store import FeatureEntry


@dataclass(frozen=True, eq=False)
class SplitFeatures:
    """One split, aligned row by row: ``X[i]`` is image ``ids[i]`` with targets ``y[i]``."""

    split: str
    pooling: str
    X: np.ndarray  # (n, D), the stored dtype (float16 by default): cast blockwise when computing
    ids: tuple[str, ...]
    y: np.ndarray  # (n, L) float32 multi-label or (n,) int64 multi-class
    mask: np.ndarray  # same leading shape as y: True where the label counts
    patients: tuple[str, ...]
    n_skipped: int  # images of the split left out because they were unreadable at extraction

    def as_torch(self) -> torch.Tensor:
        """The features as a torch tensor sharing memory with ``X``."""
        return torch.from_numpy(self.X)


#: Rows read per call to the store: bounds the decode buffers of one read to a few chunks.
READ_BLOCK_ROWS = 8192


def read_features(
    entry: FeatureEntry, pooling: str, ids: Sequence[str], block_rows: int = READ_BLOCK_ROWS
) -> np.ndarray:
    """Features of ``ids`` (in that order) in the stored dtype, read ``block_rows`` at a time
    into one preallocated array, so peak memory is the result plus one block."""
    first = entry.read(pooling, ids=ids[:block_rows])
    if len(ids) <= block_rows:
        return first
    X = np.empty((len(ids), *first.shape[1:]), dtype=first.dtype)
    X[: len(first)] = first
    del first
    for lo in range(block_rows, len(ids), block_rows):
        X[lo : lo + block_rows] = entry.read(pooling, ids=ids[lo : lo + block_rows])
    return X


def split_features(
    entry: FeatureEntry,
    table: DatasetTable,
    split: str,
    pooling: str = "cls+mean",
    volume_pooling: VolumePooling = "mean",
) -> SplitFeatures:
    """Features, targets and masks of ``split`` (``train``, ``val`` or ``test``); for a volume
    dataset one row per volume, its slices pooled by ``volume_pooling``."""
    part = _slice_features(entry, table, split, pooling)
    if table.volumes is None:
        return part
    return pool_volumes(part, table, volume_pooling)


def pool_volumes(
    part: SplitFeatures, table: DatasetTable, how: VolumePooling, block_rows: int = READ_BLOCK_ROWS
) -> SplitFeatures:
    """``part`` (slice rows of a volume dataset, each volume's slices consecutive) with one row
    per volume: float32 features pooled by ``how`` (``mean`` or ``max``), computed
    ``block_rows`` slices at a time; targets, masks and patients of the volume."""
    if table.volumes is None:
        raise ProbeInputError(f"dataset {table.name!r} has no volumes to pool slices over")
    reduce = {"mean": np.add, "max": np.maximum}.get(how)
    if reduce is None:
        raise ProbeInputError(f"Expected volume pooling 'mean' or 'max', got {how!r} instead")
    rows = table.rows_for_ids(part.ids)
    volumes = np.asarray([table.volumes[r] for r in rows], dtype=object)
    new = np.flatnonzero(np.r_[True, volumes[1:] != volumes[:-1]]) if len(rows) else rows
    names = [str(v) for v in volumes[new]]
    if len(set(names)) != len(names):
        raise ProbeInputError(
            f"the slices of a volume of {table.name!r} are not consecutive in the {part.split} "
            "split; the table lists each volume's slices together"
        )
    counts = np.diff(np.r_[new, len(rows)])
    X = np.empty((len(new), *part.X.shape[1:]), dtype=np.float32)
    per_block = max(1, block_rows // int(counts.max(initial=1)))  # whole volumes per read
    for lo in range(0, len(new), per_block):
        hi = min(len(new), lo + per_block)
        start, stop = int(new[lo]), int(new[hi - 1] + counts[hi - 1])
        block = part.X[start:stop].astype(np.float32)
        X[lo:hi] = reduce.reduceat(block, new[lo:hi] - start, axis=0)
    if how == "mean":
        X /= counts.reshape(-1, *([1] * (X.ndim - 1)))
    first = rows[new]
    return SplitFeatures(
        split=part.split,
        pooling=part.pooling,
        X=X,
        ids=tuple(names),
        y=table.labels.y[first],
        mask=table.labels.mask[first],
        patients=tuple(table.patients[r] for r in first),
        n_skipped=part.n_skipped,
    )


def _slice_features(
    entry: FeatureEntry, table: DatasetTable, split: str, pooling: str
) -> SplitFeatures:
    rows = table.indices(split)
    ids = [table.ids[r] for r in rows]
    valid = entry.valid_mask()[entry.read_rows(ids)]
    keep = np.flatnonzero(valid)
    kept = ids if len(keep) == len(ids) else [ids[i] for i in keep]
    # Only the valid rows are read, into one array of the stored dtype: no second copy.
    X = read_features(entry, pooling, kept)
    bad = nonfinite_rows(X.reshape(X.shape[0], -1)) if X.size else np.zeros(0, np.int64)
    if bad.size:
        shown = ", ".join(kept[i] for i in bad[:5]) + (" ..." if bad.size > 5 else "")
        raise ProbeInputError(
            f"{split} features '{pooling}' of entry {entry.key.digest()[:12]} hold NaN or Inf "
            f"for {bad.size} images ({shown}); a probe needs finite features. Check the entry "
            f"with `embedkit cache verify {entry.key.digest()[:12]}` and restore it with "
            "`embedkit cache repair`"
        )
    labels = table.labels
    return SplitFeatures(
        split=split,
        pooling=pooling,
        X=X,
        ids=tuple(kept),
        y=labels.y[rows[keep]],
        mask=labels.mask[rows[keep]],
        patients=tuple(table.patients[r] for r in rows[keep]),
        n_skipped=len(ids) - len(keep),
    )
