"""A volume dataset's table: one row per volume in the index, one row per slice after loading.

Labels, patients and splits are decided per volume (so a patient-wise split keeps every slice of
a volume, and of a patient, in one split); :func:`slice_table` then repeats each volume's row
once per slice. Slice ids are ``<volume id>/<slice index>``; each row keeps its volume id and
slice index (``DatasetTable.volumes`` and ``.slices``). Extraction, resume, claims and verify
see an ordinary list of images.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from embedkit.data.volumes import (
    Percentiles,
    VolumeSlice,
    VolumeSpec,
    Window,
    read_volume_header,
    volume_slices,
    window_preset,
)
from embedkit.errors import ImageReadError, ManifestError
from embedkit.manifest.index import IndexFrame
from embedkit.manifest.labels import Labels
from embedkit.manifest.schema import CTVolumes, MRVolumes
from embedkit.manifest.table import DatasetTable

__all__ = ["slice_table", "volume_spec"]


def volume_spec(config: CTVolumes | MRVolumes) -> VolumeSpec:
    """The data layer's reading spec of a manifest ``volumes:`` block."""
    if isinstance(config, CTVolumes):
        window = config.window
        intensity: Window | Percentiles = (
            window_preset(window) if isinstance(window, str) else Window(window.level, window.width)
        )
    else:
        intensity = Percentiles(*config.percentiles)
    return VolumeSpec(intensity, config.slice_axis)


def slice_table(
    table: DatasetTable,
    config: CTVolumes | MRVolumes,
    index: IndexFrame,
    positions: Sequence[int] | np.ndarray,
) -> DatasetTable:
    """``table`` (one row per volume; ``positions`` are the rows' places in the index file)
    expanded to one row per slice. Every volume's header is read (not its voxels); a missing or
    unreadable volume raises ``ManifestError`` naming its index row."""
    spec = volume_spec(config)
    problems: list[str] = []
    counts = np.zeros(len(table), dtype=np.int64)
    sources: list[VolumeSlice] = []
    for row, path in enumerate(table.paths):
        try:
            n, files = volume_slices(read_volume_header(path), spec.slice_axis)
        except ImageReadError as exc:
            problems.append(f"{index.row(positions[row])}: {exc}")
            continue
        counts[row] = n
        volume = str(path)
        sources.extend(VolumeSlice(volume, k, spec, str(files[k])) for k in range(n))
    if problems:
        shown = "\n  ".join(problems[:10])
        more = f"\n  and {len(problems) - 10} more" if len(problems) > 10 else ""
        raise ManifestError(
            f"{index.path.name}: {len(problems)} of {len(table)} volumes cannot be read:\n  "
            f"{shown}{more}\nFix or remove them (check `images` and the path column)"
        )
    rows = np.repeat(np.arange(len(table)), counts)
    slices = np.concatenate([np.arange(n) for n in counts]) if len(counts) else rows
    volume_ids = tuple(table.ids[r] for r in rows)
    return dataclasses.replace(
        _take(table, rows),
        ids=tuple(f"{v}/{k}" for v, k in zip(volume_ids, slices.tolist(), strict=True)),
        paths=tuple(Path(s.file) for s in sources),
        volume_slices=tuple(sources),
        volumes=volume_ids,
        slices=tuple(slices.tolist()),
        reading={"volumes": spec.describe()},
    )


#: Tuple fields of a table that describe the dataset, not its rows (a dataset may happen to have
#: as many classes as volumes).
_NOT_PER_ROW = frozenset({"notes", "classes"})


def _take(table: DatasetTable, rows: np.ndarray) -> DatasetTable:
    """``table`` with every per-row column taken at ``rows`` (whatever columns it has)."""
    n = len(table)
    changes: dict[str, object] = {}
    for f in dataclasses.fields(table):
        value = getattr(table, f.name)
        if f.name == "labels":
            changes[f.name] = Labels(value.kind, value.names, value.y[rows], value.mask[rows])
        elif isinstance(value, np.ndarray) and value.shape[:1] == (n,):
            changes[f.name] = value[rows]
        elif isinstance(value, tuple) and len(value) == n and f.name not in _NOT_PER_ROW:
            changes[f.name] = tuple(value[r] for r in rows)
    return dataclasses.replace(table, **changes)  # type: ignore[arg-type]
