"""The catalog index of a cache root: ``<root>/_catalog/index.json``, a speed-up only.

The catalog is derived from the entries themselves; the index keeps the summary of each
*complete* entry (complete entries are immutable) together with a stamp of the entry: size,
modification time and (S3) ETag of its completion record and the size of its usage mark, taken
from one listing of its records directory (:data:`embedkit.store.layout.RECORDS_DIR`). An
entry's ``zarr.json`` is not stamped: it is written before the completion record and never
after, and an entry removed and extracted again gets a new completion record. Listing a root
then costs the directory walk plus one listing per entry, instead of reading every entry's
metadata, unit records and sizes. An index summary is used only while its stamp equals the
entry's current stamp; added, removed, replaced or completed entries are summarised afresh,
partial entries (and directories that are no entry) always are, and the index is rewritten
when anything changed. A root we cannot write is listed the same way without writing the
index. Concurrent writers of the index each write a correct index of the moment (a single
atomic object write; the last one wins).

``_catalog`` cannot be a dataset directory: key paths never start with ``_``.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fnmatch
import json
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from embedkit.store.layout import COMPLETE_FILE, LAST_USED_FILE, RECORDS_DIR
from embedkit.store.root import CacheRoot, ObjectStat

__all__ = ["INDEX_PATH", "indexed_summaries"]

INDEX_PATH = "_catalog/index.json"
_COMPLETE_NAME = COMPLETE_FILE.removeprefix(f"{RECORDS_DIR}/")
_LAST_USED_NAME = LAST_USED_FILE.removeprefix(f"{RECORDS_DIR}/")
INDEX_FORMAT = "embedkit-catalog-index"
INDEX_VERSION = 1
#: Parallel listing requests (object stores are latency bound).
LIST_THREADS = 8

Summary = dict[str, Any]
Stamp = list[Any]


def _stat(stat: ObjectStat | None) -> list[Any]:
    if stat is None:
        return [None, None, None]
    return [stat.size, stat.mtime.isoformat() if stat.mtime else None, stat.etag]


def entry_stamp(records: Mapping[str, ObjectStat]) -> Stamp:
    """The stamp of an entry from the listing of its records directory (names, not paths)."""
    used = records.get(_LAST_USED_NAME)
    return [*_stat(records.get(_COMPLETE_NAME)), used.size if used else 0]


def _is_complete(stamp: Stamp) -> bool:
    return stamp[0] is not None  # the completion record's size


def load_index(root: CacheRoot) -> dict[str, dict[str, Any]]:
    """``relpath -> {"stamp", "summary"}`` from the index; empty if missing or unreadable."""
    try:
        doc = json.loads(root.read_bytes(INDEX_PATH))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return {}  # missing, unreadable for us (another user's file), or damaged
    if not isinstance(doc, dict) or doc.get("format") != INDEX_FORMAT:
        return {}
    if doc.get("version") != INDEX_VERSION or not isinstance(doc.get("entries"), dict):
        return {}
    return {
        str(rp): rec
        for rp, rec in doc["entries"].items()
        if isinstance(rec, dict) and isinstance(rec.get("summary"), dict)
    }


def _save_index(root: CacheRoot, entries: Mapping[str, Mapping[str, Any]]) -> None:
    doc = {
        "format": INDEX_FORMAT,
        "version": INDEX_VERSION,
        "updated_at": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "entries": dict(sorted(entries.items())),
    }
    # CacheWriteError included: the index is a speed-up, listing works without it
    with contextlib.suppress(OSError):
        root.write_bytes_atomic(INDEX_PATH, json.dumps(doc, sort_keys=True).encode())


def _entry_dirs(root: CacheRoot, pool: ThreadPoolExecutor) -> list[str]:
    """``root.glob("*/*/*.zarr")``, each level's listings in parallel (``_catalog`` skipped)."""
    level = [""]
    for pattern in ("[!_.]*", "*", "*.zarr"):
        listed = pool.map(root.listdir, level)
        level = [
            f"{prefix}/{name}" if prefix else name
            for prefix, names in zip(level, listed, strict=True)
            for name in names
            if fnmatch.fnmatchcase(name, pattern)
        ]
    return sorted(level)


def indexed_summaries(
    root: CacheRoot,
    summarise: Callable[[str], Summary | None],
    *,
    valid: Callable[[Summary], bool] = lambda s: True,
) -> list[Summary]:
    """Summaries of every entry under ``root``, sorted by path, using and refreshing the index.

    ``summarise(relpath)`` computes one summary from the entry (None: not an embedkit entry);
    ``valid`` rejects index summaries the caller can no longer use (e.g. another field set).
    """
    with ThreadPoolExecutor(LIST_THREADS) as pool:
        relpaths = _entry_dirs(root, pool)
        listed = pool.map(lambda rp: entry_stamp(root.list_files(f"{rp}/{RECORDS_DIR}")), relpaths)
        stamps = dict(zip(relpaths, listed, strict=True))
        old = load_index(root)
        out: dict[str, Summary] = {}
        todo = []
        for relpath, stamp in stamps.items():
            record = old.get(relpath)
            if (
                record is not None
                and _is_complete(stamp)
                and record.get("stamp") == stamp
                and valid(record["summary"])
            ):
                out[relpath] = record["summary"]
            else:
                todo.append(relpath)
        for relpath, summary in zip(todo, pool.map(summarise, todo), strict=True):
            if summary is not None:
                out[relpath] = summary
    new = {
        rp: {"stamp": stamps[rp], "summary": summary}
        for rp, summary in out.items()
        if _is_complete(stamps[rp]) and summary.get("complete")
    }
    if root.writable and new != old:
        _save_index(root, new)
    return [out[rp] for rp in sorted(out)]
