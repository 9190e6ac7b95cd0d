"""Garbage collection of a cache root (``embedkit cache gc``).

Three rules, each explicit:

* **Abandoned partial entries**: an entry without ``COMPLETE.json`` whose newest object (unit
  record, chunk, metadata, lease, or its ``.lock`` file on local roots) is older than
  ``partial_older_than``. A complete entry is never removed by this rule, and an entry with a
  live lease (a job writing it: see :func:`embedkit.store.lease.live_claims`), or on local
  roots a held lock (a copy into it), is never removed at all.
* **Unused complete entries** (only when asked): a complete entry whose last use is before
  ``unused_since``. Readers record use in ``<entry>/last_used.json``, refreshed by the first read
  of an opened entry at most once a day (so the mark is accurate to a day); an entry that was
  never read since that mark existed counts as used when it was completed.
* **Superseded complete entries** (only when asked): a complete entry for which a later
  complete entry of the same dataset and feature space exists with another image list (an
  older snapshot of the dataset; see :func:`embedkit.store.catalog.mark_superseded`). An entry
  that a partial entry records as a source of copied rows is kept until that entry is complete.

Writers heartbeat their leases every ttl/3, so an entry being written always has a fresh
object: on every backend the age threshold alone already protects it, and the live-lease check
protects it even with a threshold shorter than the ttl.
"""

from __future__ import annotations

import datetime as _dt
import json
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import filelock

from embedkit.store.catalog import list_entries
from embedkit.store.layout import COMPLETE_FILE, LAST_USED_FILE, LEGACY_COMPLETE_FILE, read_attrs
from embedkit.store.lease import live_claims
from embedkit.store.root import CacheRoot

__all__ = [
    "DEFAULT_PARTIAL_AGE",
    "GcCandidate",
    "collect_garbage",
    "parse_age",
    "plan_gc",
    "superseded_entries",
]

DEFAULT_PARTIAL_AGE = _dt.timedelta(days=7)
_AGE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


@dataclass(frozen=True, slots=True)
class GcCandidate:
    """An entry that ``gc`` removes (or, with ``dry_run``, would remove)."""

    relpath: str
    complete: bool
    reason: str
    last_activity: _dt.datetime | None
    size_bytes: int


def parse_age(text: str) -> _dt.timedelta:
    """``"7d"``, ``"12h"``, ``"30m"``, ``"2w"``, ``"90s"`` as a timedelta."""
    m = _AGE.match(text)
    if m is None:
        raise ValueError(f"Expected an age such as 7d, 12h, 30m or 2w, got {text!r} instead.")
    return _dt.timedelta(seconds=float(m.group(1)) * _UNITS[m.group(2)])


def _utc(t: _dt.datetime) -> _dt.datetime:
    return t if t.tzinfo else t.replace(tzinfo=_dt.UTC)


@contextmanager
def _unless_locked(root: CacheRoot, relpath: str) -> Iterator[bool]:
    """Hold the entry's lock (local roots) for the block; yields False if someone else holds it
    or a job holds a live lease on it."""
    if live_claims(root, relpath):
        yield False
        return
    lock = root.lock(relpath) if root.writable else None
    if not isinstance(lock, filelock.BaseFileLock):
        yield True
        return
    try:
        lock.acquire(timeout=0)
    except filelock.Timeout:
        yield False
        return
    try:
        yield True
    finally:
        lock.release()


def _last_used(root: CacheRoot, relpath: str, complete_at: _dt.datetime | None) -> _dt.datetime:
    try:
        mark = json.loads(root.read_bytes(f"{relpath}/{LAST_USED_FILE}"))
        return _utc(_dt.datetime.fromisoformat(str(mark["last_used"])))
    except (FileNotFoundError, KeyError, TypeError, ValueError):
        return complete_at or _dt.datetime.min.replace(tzinfo=_dt.UTC)


def _candidate(
    root: CacheRoot,
    relpath: str,
    *,
    partial_older_than: _dt.timedelta | None,
    unused_since: _dt.datetime | None,
    now: _dt.datetime,
    superseded: Mapping[str, str] | None = None,
) -> GcCandidate | None:
    files = root.entry_files(relpath)
    size = sum(st.size for st in files.values())
    # an entry of layout 1 (an earlier embedkit) is complete too: never an abandoned partial
    complete = files.get(COMPLETE_FILE) or files.get(LEGACY_COMPLETE_FILE)
    if complete is not None:
        newer = (superseded or {}).get(relpath)
        if newer:
            return GcCandidate(relpath, True, f"superseded by {newer[:12]}", complete.mtime, size)
        if unused_since is None:
            return None
        used = _last_used(root, relpath, complete.mtime)
        if used >= _utc(unused_since):
            return None
        return GcCandidate(relpath, True, f"unused since {used:%Y-%m-%d}", used, size)
    if partial_older_than is None:
        return None
    times = [st.mtime for st in files.values() if st.mtime is not None]
    lock = root.stat(f"{relpath}.lock") if root.is_local else None
    if lock is not None and lock.mtime is not None:
        times.append(lock.mtime)
    newest = max(times, default=None)
    if newest is not None and now - newest < partial_older_than:
        return None
    idle = "no objects" if newest is None else f"idle since {newest:%Y-%m-%d %H:%M}"
    return GcCandidate(relpath, False, f"partial, {idle}", newest, size)


def superseded_entries(root: CacheRoot) -> dict[str, str]:
    """``relpath -> digest of the newer entry`` of every superseded complete entry, except the
    entries a partial entry records as sources of copied rows (they are kept until it is
    complete)."""
    summaries = list_entries(root)
    in_use: set[str] = set()
    for s in summaries:
        if s.complete:
            continue
        try:
            reuse = (read_attrs(root, s.relpath).get("provenance") or {}).get("reuse") or {}
            in_use.update(str(src["relpath"]) for src in reuse.get("sources", []))
        except (FileNotFoundError, KeyError, TypeError, ValueError):
            continue  # removed meanwhile, or not an entry that copies rows
    return {
        s.relpath: s.superseded_by for s in summaries if s.superseded_by and s.relpath not in in_use
    }


def plan_gc(
    root: CacheRoot,
    *,
    partial_older_than: _dt.timedelta | None = DEFAULT_PARTIAL_AGE,
    unused_since: _dt.datetime | None = None,
    superseded: bool = False,
    now: _dt.datetime | None = None,
) -> list[GcCandidate]:
    """The entries :func:`collect_garbage` would remove now (locked entries left out)."""
    now = _utc(now or _dt.datetime.now(_dt.UTC))
    newer = superseded_entries(root) if superseded else None
    out = []
    for relpath in root.glob("*/*/*.zarr"):  # half-created entries (no zarr.json) included
        cand = _candidate(
            root,
            relpath,
            partial_older_than=partial_older_than,
            unused_since=unused_since,
            now=now,
            superseded=newer,
        )
        if cand is None:
            continue
        with _unless_locked(root, relpath) as free:
            if free:
                out.append(cand)
    return out


def collect_garbage(
    root: CacheRoot,
    *,
    partial_older_than: _dt.timedelta | None = DEFAULT_PARTIAL_AGE,
    unused_since: _dt.datetime | None = None,
    superseded: bool = False,
    dry_run: bool = False,
    now: _dt.datetime | None = None,
) -> list[GcCandidate]:
    """Remove what :func:`plan_gc` finds and return it (with ``dry_run``, only return it).

    Each entry is re-checked under its lock right before removal, so one that a writer took up
    or completed meanwhile is kept. ``partial_older_than=None`` turns the partial rule off;
    ``superseded`` adds the superseded rule.
    """
    planned = plan_gc(
        root,
        partial_older_than=partial_older_than,
        unused_since=unused_since,
        superseded=superseded,
        now=now,
    )
    if dry_run or not planned:
        return planned
    root.require_writable("remove entries from")
    removed = []
    now = _utc(now or _dt.datetime.now(_dt.UTC))
    newer = superseded_entries(root) if superseded else None  # again: a copy may have begun
    for cand in planned:
        with _unless_locked(root, cand.relpath) as free:
            if not free:
                continue
            again = _candidate(
                root,
                cand.relpath,
                partial_older_than=partial_older_than,
                unused_since=unused_since,
                now=now,
                superseded=newer,
            )
            if again is None or again.complete != cand.complete:
                continue
            root.remove_tree(cand.relpath)
            removed.append(again)
    return removed
