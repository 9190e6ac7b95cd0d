"""Read an index file (CSV, TSV or Parquet) into text columns, naming rows as users see them."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from embedkit.errors import ManifestError, did_you_mean


@dataclass(frozen=True, eq=False)
class IndexFrame:
    """The used columns of an index as text (missing cells are NA, cells are stripped).

    ``frame``'s index holds each row's 0-based position in the file, so messages can name the row
    a user finds in a spreadsheet (the header is row 1).
    """

    path: Path
    frame: pd.DataFrame

    @property
    def is_parquet(self) -> bool:
        return self.path.name.lower().endswith((".parquet", ".pq"))

    def row(self, position: int) -> str:
        """``"index.csv row 17"`` for the row at 0-based ``position`` of the file."""
        if self.is_parquet:
            return f"{self.path.name} record {int(position) + 1}"
        return f"{self.path.name} row {int(position) + 2}"

    def rows(self, positions: Sequence[int] | np.ndarray, limit: int = 5) -> str:
        """The first ``limit`` row names, then how many more."""
        positions = list(positions)
        shown = ", ".join(self.row(p).rsplit(" ", 1)[-1] for p in positions[:limit])
        more = f" and {len(positions) - limit} more" if len(positions) > limit else ""
        word = "records" if self.is_parquet else "rows"
        return f"{self.path.name} {word} {shown}{more}"


def read_index(path: Path, columns: Mapping[str, str]) -> IndexFrame:
    """Read ``columns`` (column name → the manifest field that names it) from the index at ``path``.

    Every value is read as text, so ids like ``00012`` keep their zeros; only empty cells are
    missing (``NA`` or ``None`` in a cell stay text).
    """
    if not path.is_file():
        raise ManifestError(f"{path}: index file not found; check `index` in the manifest")
    name = path.name.lower()
    parquet = name.endswith((".parquet", ".pq"))
    sep = "\t" if ".tsv" in name else ","
    try:
        if parquet:
            import pyarrow.parquet as pq

            present = list(pq.read_schema(path).names)
        else:
            present = list(pd.read_csv(path, sep=sep, nrows=0, encoding="utf-8-sig").columns)
        _require_columns(path, present, columns)
        wanted = list(dict.fromkeys(columns))
        if parquet:
            frame = pd.read_parquet(path, columns=wanted)
        else:
            frame = pd.read_csv(
                path,
                sep=sep,
                usecols=wanted,
                dtype=str,
                keep_default_na=False,
                na_values=[""],
                encoding="utf-8-sig",
            )
    except ManifestError:
        raise
    except Exception as exc:  # pandas, pyarrow and the OS each raise their own types
        raise ManifestError(f"{path}: cannot read the index: {exc}") from None
    for column in frame.columns:
        frame[column] = _as_text(frame[column])
    return IndexFrame(path=path, frame=frame)


def _as_text(series: pd.Series) -> pd.Series:
    text = series if series.dtype == "str" else series.astype("str")
    if series.dtype != "str":
        text = text.where(series.notna())
    text = text.str.strip()
    return text.where(text != "")


def _require_columns(path: Path, present: list[str], columns: Mapping[str, str]) -> None:
    missing = [(column, field) for column, field in columns.items() if column not in present]
    if not missing:
        return
    lines = [
        f"{path.name}: no column {column!r} (named by {field}){did_you_mean(column, present)}"
        for column, field in missing
    ]
    shown = ", ".join(repr(c) for c in present[:40])
    more = f" and {len(present) - 40} more" if len(present) > 40 else ""
    raise ManifestError("\n".join(lines) + f"\nColumns in {path.name}: {shown}{more}")
