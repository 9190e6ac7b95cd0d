"""cache gc: abandoned partial entries, unused complete entries, locks, dry run."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

import filelock
import numpy as np
import pytest

from embedkit.store import CacheRoot, FeatureEntry, collect_garbage, parse_age, plan_gc
from embedkit.store.layout import COMPLETE_FILE, LAST_USED_FILE
from embedkit.store.lease import Leases

DIMS = {"cls": (4,)}


def build(root: CacheRoot, kit: Any, *, model: str, units: int | None) -> FeatureEntry:
    ids = kit.make_ids(12)
    key = kit.make_key(ids, poolings=("cls",), model=model)
    entry = FeatureEntry.create_or_open(
        root, key, ids=ids, shapes=DIMS, unit_rows=4, provenance={"created_by": "test"}
    )
    feats = kit.make_features(12, DIMS)
    for u in range(entry.n_units if units is None else units):
        s, e = entry.unit_bounds(u)
        entry.write_unit(u, {"cls": feats["cls"][s:e]}, valid=np.ones(e - s, bool))
    if units is None:
        entry.finalize()
    return entry


def test_parse_age() -> None:
    assert parse_age("7d") == dt.timedelta(days=7)
    assert parse_age("12h") == dt.timedelta(hours=12)
    assert parse_age("2w") == dt.timedelta(weeks=2)
    with pytest.raises(ValueError, match="Expected an age such as 7d"):
        parse_age("7 days")


def test_partial_entries_older_than_threshold(root: CacheRoot, kit: Any) -> None:
    done = build(root, kit, model="m/complete", units=None)
    partial = build(root, kit, model="m/partial", units=1)
    now = dt.datetime.now(dt.UTC)
    # fresh: nothing is old enough
    assert plan_gc(root, now=now) == []
    later = now + dt.timedelta(days=8)
    (cand,) = plan_gc(root, now=later)  # the complete entry is never a partial candidate
    assert (cand.relpath, cand.complete) == (partial.relpath, False)
    assert cand.size_bytes == root.size_bytes(partial.relpath) > 0
    dry = collect_garbage(root, dry_run=True, now=later)
    assert [c.relpath for c in dry] == [partial.relpath]
    assert root.exists(partial.relpath)
    removed = collect_garbage(root, now=later)
    assert [c.relpath for c in removed] == [partial.relpath]
    assert not root.exists(partial.relpath)
    assert root.exists(f"{done.relpath}/{COMPLETE_FILE}")
    assert collect_garbage(root, now=later, partial_older_than=dt.timedelta(0)) == []


def test_unused_complete_entries_only_on_request(root: CacheRoot, kit: Any) -> None:
    used = build(root, kit, model="m/used", units=None)
    idle = build(root, kit, model="m/idle", units=None)
    FeatureEntry.open(root, used.relpath).read("cls")  # a reader marks it as used
    mark = json.loads(root.read_bytes(f"{used.relpath}/{LAST_USED_FILE}"))
    assert mark["last_used"].startswith(str(dt.datetime.now(dt.UTC).year))
    # pretend the idle entry was last used long ago
    root.write_bytes_atomic(
        f"{idle.relpath}/{LAST_USED_FILE}",
        json.dumps({"last_used": "2020-01-01T00:00:00+00:00"}).encode(),
    )
    assert plan_gc(root) == []  # no --unused-since: complete entries are kept
    since = dt.datetime.now(dt.UTC) - dt.timedelta(days=1)
    (cand,) = collect_garbage(root, unused_since=since)
    assert (cand.relpath, cand.complete, cand.reason) == (
        idle.relpath,
        True,
        "unused since 2020-01-01",
    )
    assert not root.exists(idle.relpath)
    assert root.exists(used.relpath)
    # never read since completion: the completion time counts as its last use
    future = dt.datetime.now(dt.UTC) + dt.timedelta(days=1)
    root.remove_tree(f"{used.relpath}/{LAST_USED_FILE}")
    assert [c.relpath for c in plan_gc(root, unused_since=future)] == [used.relpath]


def test_entry_with_held_lock_is_never_removed(tmp_path: Path, kit: Any) -> None:
    root = CacheRoot.from_uri(tmp_path / "c")
    partial = build(root, kit, model="m/partial", units=1)
    later = dt.datetime.now(dt.UTC) + dt.timedelta(days=30)
    other = filelock.FileLock(str(root.local_path / f"{partial.relpath}.lock"), is_singleton=False)  # type: ignore[operator]
    with other:  # a writer in another process holds the entry
        assert plan_gc(root, now=later) == []
        assert collect_garbage(root, now=later) == []
    assert root.exists(partial.relpath)
    assert [c.relpath for c in collect_garbage(root, now=later)] == [partial.relpath]


def test_entry_with_a_live_claim_is_never_removed(root: CacheRoot, kit: Any) -> None:
    partial = build(root, kit, model="m/partial", units=1)
    with Leases(root, partial.relpath, ttl_s=30) as job:  # a job is writing unit 1
        assert job.claim_unit(partial) == 1
        assert plan_gc(root, partial_older_than=dt.timedelta(0)) == []
        assert collect_garbage(root, partial_older_than=dt.timedelta(0)) == []
    # released: the entry is an idle partial one again
    removed = collect_garbage(root, partial_older_than=dt.timedelta(0))
    assert [c.relpath for c in removed] == [partial.relpath]
