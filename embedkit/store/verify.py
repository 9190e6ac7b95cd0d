"""Verifying a feature cache entry against its records: arrays, ids, units, checksums, NaN/Inf.

:func:`verify_entry` re-reads everything (``embedkit cache verify``); :func:`check_unit` checks
one unit's stored bytes against a unit record, the entry's own or a source entry's (copies,
local read caches).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import zarr

from embedkit.errors import IntegrityError
from embedkit.store.checks import checksum, nonfinite_rows
from embedkit.store.key import digest_ids
from embedkit.store.layout import (
    COMPLETE_FILE,
    IMAGE_ARRAY,
    VALID_ARRAY,
    feature_array,
    fmt_ids,
    is_feature_array,
)
from embedkit.store.reader import EntryReader

__all__ = ["check_unit", "damaged_units", "verify_entry"]


def _cause(exc: BaseException) -> BaseException:
    """The low-level failure under a reader's :class:`IntegrityError` (its message is long)."""
    return exc.__cause__ if isinstance(exc, IntegrityError) and exc.__cause__ else exc


def check_unit(reader: EntryReader, u: int, record: Mapping[str, object]) -> list[str]:
    """Problems of unit ``u`` of an entry against a unit ``record`` (its own or a source's).

    Re-reads the unit's rows of every array the record has a checksum for; ``[]`` means the
    stored bytes match.
    """
    start, stop = reader.layout.unit_bounds(u)
    if record.get("rows") != [start, stop]:
        return [f"unit {u}: record rows {record.get('rows')} != [{start}, {stop}]"]
    checksums = record.get("checksums")
    if not isinstance(checksums, dict) or not checksums:
        return [f"unit {u}: the record holds no checksums"]
    algorithm = str(record.get("checksum_algorithm", "sha256"))
    problems = []
    for name, want in checksums.items():
        try:
            data = reader.read_rows_of(name, start, stop, verify=False)
        except Exception as exc:  # a damaged chunk or array fails in many ways
            problems.append(
                f"unit {u} (rows {start}-{stop}): {name} cannot be read ({_cause(exc)})"
            )
            continue
        if checksum(data, algorithm) != want:
            problems.append(f"unit {u} (rows {start}-{stop}): checksum mismatch in {name}")
    return problems


def verify_entry(reader: EntryReader) -> list[str]:
    """Re-read everything and return the problems found; ``[]`` means healthy.

    Never raises for damage: whatever is wrong (bad JSON or zarr metadata, missing arrays,
    records or chunks) is reported as a problem and the rest is still checked.
    """
    try:
        return _verify_entry(reader)
    except Exception as exc:  # damage of a kind the checks below did not foresee
        return [f"cannot be checked: {type(exc).__name__}: {exc}"]


def damaged_units(reader: EntryReader) -> dict[int, list[str]]:
    """The units of an entry whose stored data or record is damaged, with the problems.

    Raises :class:`IntegrityError` for damage outside the units (array metadata, ids) that
    recomputing units cannot fix.
    """
    problems, arrays, stored_ids = _arrays(reader)
    if problems:
        raise IntegrityError(
            f"{reader.layout.uri} is damaged beyond its units ({'; '.join(problems)}); "
            "re-extract it with --overwrite."
        )
    done = reader.layout.done_units()
    found = {}
    for u in range(reader.layout.n_units):
        unit = _unit_problems(reader, arrays, stored_ids, u, done)
        if unit:
            found[u] = unit
    return found


def _verify_entry(reader: EntryReader) -> list[str]:
    lay = reader.layout
    problems, arrays, stored_ids = _arrays(reader)
    done = lay.done_units()
    for u in range(lay.n_units):
        problems.extend(_unit_problems(reader, arrays, stored_ids, u, done))
    if not lay.is_complete:
        problems.append(
            f"no {COMPLETE_FILE}: entry incomplete ({len(done)} of {lay.n_units} units written)"
        )
    return problems


def _arrays(
    reader: EntryReader,
) -> tuple[list[str], dict[str, zarr.Array[Any]], tuple[str, ...]]:
    """Problems of the entry's arrays as a whole, the arrays that open, and the image ids."""
    lay = reader.layout
    problems: list[str] = []
    arrays: dict[str, zarr.Array[Any]] = {}
    for pooling, spec in lay.attrs["poolings"].items():
        name = feature_array(pooling)
        try:
            arr = lay.feature(pooling)
        except Exception as exc:  # missing, or its zarr.json is damaged
            problems.append(f"{name}: array missing or unreadable ({exc})")
            continue
        if list(arr.shape) != list(spec["shape"]) or str(arr.dtype) != spec["dtype"]:
            problems.append(
                f"{name}: expected {spec['dtype']} {tuple(spec['shape'])} per attrs, "
                f"found {arr.dtype} {arr.shape}"
            )
            continue
        if lay.unit_rows % arr.chunks[0]:
            problems.append(
                f"{name}: chunks of {arr.chunks[0]} rows straddle units of {lay.unit_rows} rows"
            )
        arrays[name] = arr
    stored_ids: tuple[str, ...]
    try:
        stored_ids = lay.ids
        if len(stored_ids) != lay.n_images or digest_ids(stored_ids) != lay.key.ids_digest:
            problems.append(f"{IMAGE_ARRAY}: the stored image ids do not match key.ids_digest")
    except Exception as exc:
        problems.append(f"{IMAGE_ARRAY}: array missing or unreadable ({exc})")
        stored_ids = tuple(str(i) for i in range(lay.n_images))
    try:
        arrays[VALID_ARRAY] = lay.array(VALID_ARRAY)
    except Exception as exc:
        problems.append(f"{VALID_ARRAY}: array missing or unreadable ({exc})")
    return problems, arrays, stored_ids


def _unit_problems(
    reader: EntryReader,
    arrays: Mapping[str, zarr.Array[Any]],
    stored_ids: Sequence[str],
    u: int,
    done: set[int],
) -> list[str]:
    """Problems of unit ``u``: its record, and every array's rows against it."""
    lay = reader.layout
    start, stop = lay.unit_bounds(u)
    if u not in done:
        return [f"unit {u} (rows {start}-{stop}): no completion record"]
    try:
        record = lay.unit_record(u)
        if not isinstance(record, dict):
            raise ValueError("not a JSON object")
    except Exception as exc:
        return [f"unit {u} (rows {start}-{stop}): unreadable record ({exc})"]
    problems: list[str] = []
    if record.get("rows") != [start, stop]:
        problems.append(f"unit {u}: record rows {record.get('rows')} != [{start}, {stop}]")
    checksums = record.get("checksums")
    checksums = checksums if isinstance(checksums, dict) else {}
    algorithm = str(record.get("checksum_algorithm", "sha256"))
    valid: np.ndarray | None = None
    for name in arrays:
        try:
            data = reader.read_rows_of(name, start, stop, verify=False)
        except Exception as exc:  # a missing, short or corrupt chunk
            problems.append(
                f"unit {u} (rows {start}-{stop}): {name} cannot be decoded ({_cause(exc)})"
            )
            continue
        if name == VALID_ARRAY:
            valid = np.asarray(data, dtype=bool)
        want = checksums.get(name)
        if want is None:
            problems.append(f"unit {u}: no checksum recorded for {name}")
        elif checksum(data, algorithm) != want:
            problems.append(f"unit {u} (rows {start}-{stop}): checksum mismatch in {name}")
        if is_feature_array(name) and data.dtype.kind == "f":
            bad = nonfinite_rows(data)  # skipped rows are stored as zeros
            if bad.any():
                bad_ids = [stored_ids[start + int(i)] for i in np.flatnonzero(bad)]
                problems.append(f"unit {u}: NaN/Inf in {name} for {fmt_ids(bad_ids)}")
    if valid is not None and int(valid.sum()) != record.get("n_valid"):
        problems.append(
            f"unit {u}: {int(valid.sum())} valid rows, record says {record.get('n_valid')}"
        )
    return problems
