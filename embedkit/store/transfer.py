"""Copy complete entries between cache roots (``embedkit cache push`` / ``cache pull``).

The copy goes object by object in an order that keeps every reader safe: array data and
metadata first, then the per-unit records (a record implies its chunks are there), then, after
the destination verified against the records' checksums, the completion record. So a reader of the
destination never sees a half-copied entry as complete. An interrupted copy resumes: data objects
already present with the right size are skipped; the small JSON objects are always rewritten.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from embedkit.errors import EntryExistsError, IncompleteEntryError, IntegrityError
from embedkit.store.catalog import find_entry
from embedkit.store.entry import FeatureEntry, remove_entry
from embedkit.store.layout import COMPLETE_FILE, LAST_USED_FILE, LEASES_DIR, record_unit
from embedkit.store.root import CacheRoot, ObjectStat, check_object_path

__all__ = ["CopiedObject", "copy_entry", "copy_object"]

#: Parallel object copies (object stores are latency bound; local disks do not mind).
COPY_THREADS = 8
_COMPLETE = COMPLETE_FILE


@dataclass(frozen=True, slots=True)
class CopiedObject:
    """One object of a copy, reported to ``on_object``: its path in the entry and what happened."""

    path: str
    size: int
    skipped: bool


def _is_record(path: str) -> bool:
    return record_unit(path) is not None


def copy_object(
    src_root: CacheRoot,
    dst_root: CacheRoot,
    relpath: str,
    path: str,
    size: int,
    have: ObjectStat | None = None,
) -> bool:
    """Copy the object ``path`` of entry ``relpath``, atomically; returns whether it was skipped.

    A data object already at the destination with the source's ``size`` (``have``) is skipped
    (the verification after the copy catches a wrong one); JSON objects are always rewritten.
    """
    check_object_path(src_root.url(relpath), path)
    if have is not None and have.size == size and not path.endswith(".json"):
        return True
    dst_root.write_bytes_atomic(f"{relpath}/{path}", src_root.read_bytes(f"{relpath}/{path}"))
    return False


def copy_entry(
    src_root: CacheRoot,
    dst_root: CacheRoot,
    query: str,
    *,
    verify: bool = True,
    overwrite: bool = False,
    on_object: Callable[[CopiedObject], None] | None = None,
) -> FeatureEntry:
    """Copy the complete entry named by ``query`` (digest, prefix or path) to ``dst_root``.

    The destination keeps the same relative path. A complete destination entry is refused
    (:class:`EntryExistsError`) unless ``overwrite`` (which removes any destination entry,
    complete or partial, first); a partial one (an interrupted copy or extraction) is
    completed in place. With ``verify`` the destination is re-read and checked
    against the source's per-unit checksums before the completion record is written; a mismatch
    raises :class:`IntegrityError` and leaves the destination incomplete. Returns the
    destination entry, opened for reading.
    """
    src = find_entry(src_root, query, allow_partial=False)
    relpath = src.relpath
    dst_root.require_writable(f"copy {relpath} into")
    if src_root.url(relpath) == dst_root.url(relpath):
        raise ValueError(f"Source and destination are the same entry ({src.uri}).")
    if overwrite and dst_root.exists(relpath):
        remove_entry(dst_root, relpath)  # complete or partial: recopy every object
    elif dst_root.exists(f"{relpath}/{_COMPLETE}"):
        raise EntryExistsError(
            f"{dst_root.url(relpath)} is already complete; completed entries are immutable. "
            "Pass --overwrite to replace it with the copy."
        )

    with dst_root.lock(relpath):  # local destinations: one copy at a time (not leases)
        objects = {
            p: st
            for p, st in src_root.entry_files(relpath).items()
            if p != LAST_USED_FILE and not p.startswith(f"{LEASES_DIR}/")
        }
        if _COMPLETE not in objects:
            raise IntegrityError(f"{src.uri} lost its {_COMPLETE} while being copied.")
        present = dst_root.entry_files(relpath)
        data = [p for p in objects if p != _COMPLETE and not _is_record(p)]
        records = [p for p in objects if _is_record(p)]

        def copy_one(path: str) -> None:
            size = objects[path].size
            skip = copy_object(src_root, dst_root, relpath, path, size, present.get(path))
            if on_object is not None:
                on_object(CopiedObject(path, size, skip))

        with ThreadPoolExecutor(COPY_THREADS) as pool:
            list(pool.map(copy_one, data))  # list(): re-raise the first failure
            list(pool.map(copy_one, records))

        dst = FeatureEntry.open(dst_root, relpath, allow_partial=True)
        if verify:
            _check_copy(src, dst)
        copy_one(_COMPLETE)
    return FeatureEntry.open(dst_root, relpath)


def _check_copy(src: FeatureEntry, dst: FeatureEntry) -> None:
    """The destination's records equal the source's, and its data matches their checksums."""
    problems = [p for p in dst.verify() if not p.startswith(f"no {_COMPLETE}")]
    for u in range(src.n_units):
        try:
            same = dst.unit_record(u)["checksums"] == src.unit_record(u)["checksums"]
        except (KeyError, IncompleteEntryError, json.JSONDecodeError):
            same = False
        if not same:
            problems.append(f"unit {u}: checksums differ from the source's record")
    if problems:
        shown = "\n  ".join(problems[:10])
        raise IntegrityError(
            f"The copy at {dst.uri} does not match {src.uri}; it was left incomplete:\n  {shown}"
            "\nRerun the copy with --overwrite to recopy every object."
        )
