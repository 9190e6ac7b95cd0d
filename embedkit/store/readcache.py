"""A local read-through cache of remote entries (``--local-cache DIR``).

:func:`open_local_copy` turns a complete entry of any root (S3, a shared filesystem) into an
entry on local disk, at the same relative path under ``DIR``, so that reads run at local speed.
The copy is an ordinary entry (``DIR`` is a valid cache root): array metadata and ids first,
then unit by unit the unit's chunk objects, checked against the *remote* unit record's
checksums before that record is written, then the completion record last. The object copy and the
unit check are :mod:`embedkit.store.transfer`'s (``cache pull`` uses them too).

Reuse. A local copy is used only while it is the copy of the remote entry as it is now:

* its ``zarr.json`` (key, creation time, layout) and completion record must equal the remote's
  byte for byte: two small GETs per open. A remote entry removed and extracted again differs in
  both (creation and completion times), so the local copy is dropped and fetched again;
* every local file must still have the size and mtime it had when its unit was verified
  (recorded in ``<DIR>/<entry>.readcache.json``); a unit with a changed, missing or extra file is
  re-checked against its record and fetched again if damaged. ``full_check=True`` re-checks every
  unit's checksums instead (what ``embedkit cache verify --local-cache`` does), which also
  catches damage that kept size and mtime.

No data object of the remote entry is read on this warm path. The remote entry's "last used"
mark is refreshed as a direct read would (at most once a day), so ``cache gc --unused-since``
sees entries read through a local cache as used.

Resume and concurrency. A unit counts as copied iff its local record exists (written after its
checked chunks, each file written atomically), so an interrupted fill resumes where it stopped.
Processes filling the same local copy take the entry's lock file (``<DIR>/<entry>.lock``) in
turn: the second waits, then finds the copy warm. Filling a local copy while another process
*reads* it is safe unless the remote entry changed (the stale copy is then removed first).

There is no size bound or eviction: remove local copies with ``embedkit cache gc --cache DIR
--unused-since DATE`` or by deleting their directories.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from embedkit.errors import CacheNotFoundError, ConfigError, IncompleteEntryError, IntegrityError
from embedkit.store.entry import FeatureEntry
from embedkit.store.key import digest_ids
from embedkit.store.layout import (
    COMPLETE_FILE,
    IMAGE_ARRAY,
    LAST_USED_FILE,
    LAST_USED_INTERVAL_S,
    META_FILE,
    RECORDS_DIR,
    VALID_ARRAY,
    entry_relpaths,
    feature_array,
    record_unit,
    unit_record_name,
)
from embedkit.store.root import CacheRoot, ObjectStat
from embedkit.store.transfer import COPY_THREADS, copy_object

__all__ = ["LocalCopy", "local_copy_status", "open_local_copy", "verify_local_copies"]

STATE_SUFFIX = ".readcache.json"
_COMPLETE = COMPLETE_FILE
_META = META_FILE
_IDENTITY = (_META, _COMPLETE)
_CHUNK = re.compile(r"^(?P<array>.+?)/c[/.](?P<first>\d+)(?:[/.]|$)")
_THREAD_LOCKS: dict[str, threading.Lock] = {}
_THREAD_LOCKS_GUARD = threading.Lock()

#: ``(total, description) -> context manager yielding advance(n)``, e.g. ``rich_progress``.
ProgressFactory = Callable[[int, str], AbstractContextManager[Callable[[int], None]]]
State = Literal["warm", "filled", "resumed", "repaired", "refreshed"]


@dataclass(frozen=True, slots=True)
class LocalCopy:
    """The local copy of a remote entry, opened for reading, and what opening it took.

    ``state``: ``warm`` (used as it was), ``filled`` (copied from scratch), ``resumed`` (an
    interrupted copy finished), ``repaired`` (damaged local units fetched again), ``refreshed``
    (the remote entry had changed: the old copy was dropped and the new one fetched).
    """

    entry: FeatureEntry
    remote_uri: str
    state: State
    units_fetched: int
    units_checked: int
    bytes_fetched: int


def _local_root(cache_dir: str | Path | CacheRoot) -> CacheRoot:
    root = cache_dir if isinstance(cache_dir, CacheRoot) else CacheRoot.from_uri(cache_dir)
    if root.local_path is None:
        raise ConfigError(
            f"Expected a local directory for the local cache, got {root.uri} instead. Pass a "
            "path on local disk (e.g. --local-cache ~/.cache/embedkit-local)."
        )
    root.require_writable("keep local copies in")
    return root


@contextmanager
def _exclusive(root: CacheRoot, relpath: str) -> Iterator[None]:
    """The entry's lock file (other processes) and a thread lock (this process's threads)."""
    key = root.url(relpath)
    with _THREAD_LOCKS_GUARD:
        tlock = _THREAD_LOCKS.setdefault(key, threading.Lock())
    with tlock, root.lock(relpath):
        yield


def _read_or_none(root: CacheRoot, path: str) -> bytes | None:
    try:
        return root.read_bytes(path)
    except FileNotFoundError:
        return None


def _unit_of(path: str, unit_arrays: set[str]) -> int | None:
    """The unit whose chunk ``path`` is (an object of a per-unit array), else None."""
    m = _CHUNK.match(path)
    if m is None or m.group("array") not in unit_arrays:
        return None
    return int(m.group("first"))


def _stamp(stat: ObjectStat) -> list[Any]:
    return [stat.size, stat.mtime.isoformat() if stat.mtime else None]


def _local_files(local: CacheRoot, relpath: str) -> dict[str, ObjectStat]:
    return {p: st for p, st in local.entry_files(relpath).items() if p != LAST_USED_FILE}


def _changed_paths(local: CacheRoot, relpath: str) -> set[str] | None:
    """Local files whose stat differs from the recorded state (None: no usable state)."""
    raw = _read_or_none(local, relpath + STATE_SUFFIX)
    if raw is None:
        return None
    try:
        recorded: dict[str, list[Any]] = json.loads(raw)["files"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return None
    now = {p: _stamp(st) for p, st in _local_files(local, relpath).items()}
    return {p for p in recorded.keys() | now.keys() if recorded.get(p) != now.get(p)}


def _write_state(local: CacheRoot, relpath: str, remote_uri: str) -> None:
    files = {p: _stamp(st) for p, st in _local_files(local, relpath).items()}
    body = {"source": remote_uri, "files": files}
    local.write_bytes_atomic(relpath + STATE_SUFFIX, json.dumps(body).encode())


def _drop(local: CacheRoot, relpath: str) -> None:
    local.remove_tree(relpath)
    local.remove_tree(relpath + STATE_SUFFIX)


def open_local_copy(
    remote: FeatureEntry,
    cache_dir: str | Path | CacheRoot,
    *,
    full_check: bool = False,
    progress: ProgressFactory | None = None,
) -> LocalCopy:
    """The local copy of the complete entry ``remote`` under ``cache_dir``, fetched as needed.

    See the module docstring for when a copy is reused, re-checked or fetched again. Raises
    :class:`IncompleteEntryError` for a partial remote entry and :class:`IntegrityError` when
    a remote unit does not match its own record (the remote entry is damaged: run
    ``embedkit cache verify`` on it). ``progress`` is a factory ``(total, description)`` of a
    context manager yielding ``advance(n)`` (see :mod:`embedkit.progress`), used while units
    are copied.
    """
    local = _local_root(cache_dir)
    relpath = remote.relpath
    src = remote.root
    if local.url(relpath) == remote.uri:
        raise ConfigError(
            f"The local cache {local.uri} is the root of {remote.uri} itself; choose another "
            "--local-cache directory (or none: the entry is already local)."
        )
    with _exclusive(local, relpath):
        with ThreadPoolExecutor(2) as pool:  # the two identity objects, in one round trip
            meta, done = pool.map(lambda name: _read_or_none(src, f"{relpath}/{name}"), _IDENTITY)
        if meta is None or done is None:
            missing = _META if meta is None else _COMPLETE
            raise IncompleteEntryError(
                f"{remote.uri} is not a complete entry (no {missing}); only complete entries "
                "are copied into a local cache. Finish it with `embedkit extract` first."
            )
        state: State = "filled"
        local_meta = _read_or_none(local, f"{relpath}/{_META}")
        local_done = _read_or_none(local, f"{relpath}/{_COMPLETE}")
        if local_meta is not None and (
            local_meta != meta or (local_done is not None and local_done != done)
        ):
            _drop(local, relpath)  # another remote entry now lives at this path
            state, local_done = "refreshed", None
        elif local_meta is not None:
            state = "resumed" if local_done is None else "repaired"
        changed = _changed_paths(local, relpath) if local_done is not None else None
        if local_done is not None and changed == set() and not full_check:
            copy = LocalCopy(FeatureEntry.open(local, relpath), remote.uri, "warm", 0, 0, 0)
        else:
            copy = _fill(remote, local, meta, done, changed, full_check, state, progress)
    src.touch(f"{relpath}/{LAST_USED_FILE}", min_interval_s=LAST_USED_INTERVAL_S)
    return copy


def _fill(
    remote: FeatureEntry,
    local: CacheRoot,
    meta: bytes,
    done: bytes,
    changed: set[str] | None,
    full_check: bool,
    state: State,
    progress: ProgressFactory | None,
) -> LocalCopy:
    """Copy what is missing or damaged; ``changed`` None means every present unit is checked."""
    relpath, src = remote.relpath, remote.root
    objects = {p: st for p, st in src.entry_files(relpath).items() if p != LAST_USED_FILE}
    unit_arrays = {feature_array(p) for p in remote.poolings} | {VALID_ARRAY}
    per_unit: dict[int, list[str]] = {u: [] for u in range(remote.n_units)}
    metadata: list[str] = []
    for path in objects:
        u = _unit_of(path, unit_arrays)
        if u is not None and u in per_unit:
            per_unit[u].append(path)
        elif path != _COMPLETE and record_unit(path) is None and path != _META:
            metadata.append(path)
    present = _local_files(local, relpath)
    fetched_bytes = [0]
    lock = threading.Lock()

    def fetch(paths: list[str], *, force: bool) -> None:
        for path in paths:
            have = None if force else present.get(path)
            unchanged = changed is not None and path not in changed
            if have is not None and have.size == objects[path].size and unchanged:
                continue  # as it was when verified (JSON included)
            if not copy_object(src, local, relpath, path, objects[path].size, have):
                with lock:
                    fetched_bytes[0] += objects[path].size

    # Metadata first (array zarr.json, ids), the group's zarr.json last: only then does the
    # local copy open as an entry.
    fetch(metadata, force=changed is None or any(p in changed for p in metadata))
    local.write_bytes_atomic(f"{relpath}/{_META}", meta)
    entry = FeatureEntry.open(local, relpath, allow_partial=True)
    if digest_ids(entry.ids) != entry.key.ids_digest:
        ids = [
            p
            for p in metadata
            if p.startswith(f"{IMAGE_ARRAY}/") and not p.startswith(f"{RECORDS_DIR}/")
        ]
        fetch(ids, force=True)
        entry = FeatureEntry.open(local, relpath, allow_partial=True)
        if digest_ids(entry.ids) != entry.key.ids_digest:
            raise IntegrityError(
                f"The image ids of {remote.uri} do not match its key; the remote entry is "
                "damaged. Run `embedkit cache verify` on it."
            )

    local_units = entry.done_units()

    def suspect(u: int) -> bool:
        if u not in local_units:
            return True
        if full_check or changed is None:
            return True
        return any(p in changed for p in [*per_unit[u], unit_record_name(u)])

    todo = [u for u in range(remote.n_units) if suspect(u)]
    checked = [0, 0]  # units re-checked locally, units fetched

    def one(u: int) -> None:
        record_path = f"{relpath}/{unit_record_name(u)}"
        record_bytes = src.read_bytes(record_path)
        record = json.loads(record_bytes)
        if u in local_units and _read_or_none(local, record_path) == record_bytes:
            with lock:
                checked[0] += 1
            if not entry.check_unit(u, record):
                return  # the local unit matches the remote record: keep it
        fetch(per_unit[u], force=True)
        problems = entry.check_unit(u, record)
        if problems:
            raise IntegrityError(
                f"Unit {u} of {remote.uri} does not match its own record after a fresh copy "
                f"({'; '.join(problems[:3])}): the remote entry is damaged. Run "
                f"`embedkit cache verify --cache {remote.root.uri} {remote.key.short()}`."
            )
        local.write_bytes_atomic(record_path, record_bytes)
        with lock:
            checked[1] += 1

    bar = progress(len(todo), f"local copy {remote.key.short()}") if progress and todo else None
    bar_cm = bar if bar is not None else _no_bar()
    with bar_cm as advance, ThreadPoolExecutor(COPY_THREADS) as pool:
        futures = [pool.submit(one, u) for u in todo]
        try:
            for future in futures:
                future.result()  # re-raise the first failure; finished units stay copied
                advance(1)
        except BaseException:  # a failure or Ctrl-C: start no further unit
            for future in futures:
                future.cancel()
            raise
    local.write_bytes_atomic(f"{relpath}/{_COMPLETE}", done)
    _write_state(local, relpath, remote.uri)
    if state == "repaired" and checked[1] == 0 and fetched_bytes[0] == 0:
        state = "warm"  # re-checked (full_check or unrecorded stats), nothing was damaged
    return LocalCopy(
        FeatureEntry.open(local, relpath),
        remote.uri,
        state,
        units_fetched=checked[1],
        units_checked=checked[0],
        bytes_fetched=fetched_bytes[0],
    )


@contextmanager
def _no_bar() -> Iterator[Callable[[int], None]]:
    yield lambda n: None


def local_copy_status(remote: FeatureEntry, cache_dir: str | Path | CacheRoot) -> str:
    """One line on the local copy of ``remote``: absent, partial, stale or current (no fetch)."""
    local = CacheRoot.from_uri(cache_dir) if not isinstance(cache_dir, CacheRoot) else cache_dir
    relpath = remote.relpath
    where = local.url(relpath)
    local_meta = _read_or_none(local, f"{relpath}/{_META}")
    if local_meta is None:
        return f"none in {local.uri}"
    if local_meta != _read_or_none(remote.root, f"{relpath}/{_META}"):
        return f"stale (the remote entry changed; the next read fetches it again): {where}"
    local_done = _read_or_none(local, f"{relpath}/{_COMPLETE}")
    if local_done is None:
        n = len(FeatureEntry.open(local, relpath, allow_partial=True).done_units())
        return f"partial, {n} of {remote.n_units} units (the next read resumes it): {where}"
    if local_done != _read_or_none(remote.root, f"{relpath}/{_COMPLETE}"):
        return f"stale (the remote entry changed; the next read fetches it again): {where}"
    changed = _changed_paths(local, relpath)
    if changed:
        return f"{len(changed)} local files changed (the next read re-checks them): {where}"
    return f"current: {where}"


def verify_local_copies(
    root: CacheRoot, cache_dir: str | Path | CacheRoot, query: str | None = None
) -> dict[str, list[str]]:
    """``embedkit cache verify --local-cache``: problems per entry, checked through local copies.

    Each complete entry of ``root`` (or the one named by ``query``) is brought into the local
    cache with ``full_check`` (every unit re-checked against the remote records, damaged or
    missing units fetched again), then the local copy is verified in full. Partial entries
    are verified on ``root`` directly. ``[]`` means healthy.
    """
    from embedkit.store.catalog import find_entry

    if query is not None:
        found = find_entry(root, query)
        relpaths = [found.relpath]
        root = found.root
    else:
        relpaths = entry_relpaths(root)
    results: dict[str, list[str]] = {}
    for relpath in relpaths:
        try:
            entry = FeatureEntry.open(root, relpath, allow_partial=True)
        except (CacheNotFoundError, KeyError, ValueError) as exc:
            results[relpath] = [f"cannot open: {exc}"]
            continue
        if not entry.is_complete:
            results[relpath] = entry.verify()
            continue
        try:
            results[relpath] = open_local_copy(entry, cache_dir, full_check=True).entry.verify()
        except IntegrityError as exc:
            results[relpath] = [str(exc)]
    return results
