"""Exclusive create and unit claims (leases), on every backend (local, memory://, s3:// moto)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import embedkit.store.writer as writer_mod
from embedkit.errors import ConfigError, EntryExistsError
from embedkit.store import CacheRoot, FeatureEntry
from embedkit.store.layout import COMPLETE_FILE, LEASES_DIR
from embedkit.store.lease import TTL_ENV, Leases, Owner, live_claims, resolve_ttl

DIMS = {"cls": (4,)}
N, UNIT = 12, 3  # 4 units


def new_entry(root: CacheRoot, kit: Any, **kw: Any) -> FeatureEntry:
    ids = kit.make_ids(N)
    key = kit.make_key(ids, poolings=tuple(DIMS))
    return FeatureEntry.create_or_open(
        root, key, ids=ids, shapes=DIMS, unit_rows=UNIT, provenance={"by": "test"}, **kw
    )


def write(entry: FeatureEntry, u: int) -> None:
    s, e = entry.unit_bounds(u)
    feats = np.full((e - s, 4), float(u), dtype=np.float32)
    entry.write_unit(u, {"cls": feats}, valid=np.ones(e - s, bool))


def race(n: int, fn: Callable[[int], Any]) -> list[Any]:
    """Run ``fn(i)`` on ``n`` threads released at once; their results in order."""
    barrier = threading.Barrier(n)
    out: list[Any] = [None] * n

    def run(i: int) -> None:
        barrier.wait()
        try:
            out[i] = fn(i)
        except Exception as exc:  # reported to the test as a value
            out[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def test_create_exclusive_creates_once(root: CacheRoot) -> None:
    assert root.exclusive_create == "atomic"
    assert root.create_exclusive("x/claim.json", b"first")
    assert not root.create_exclusive("x/claim.json", b"second")
    assert root.read_bytes("x/claim.json") == b"first"
    assert root.listdir("x") == ["claim.json"]  # no temporary file left behind


def test_small_file_reads_in_one_request(root: CacheRoot) -> None:
    assert not root.is_file("small/a.json")
    root.write_bytes_atomic("small/a.json", b'{"x": 1}')
    assert root.is_file("small/a.json") and not root.is_file("small")
    assert root.read_small("small/a.json") == b'{"x": 1}'
    with pytest.raises(FileNotFoundError):
        root.read_small("small/b.json")


def test_create_exclusive_race_has_one_winner(root: CacheRoot) -> None:
    won = race(6, lambda i: root.create_exclusive("race.json", f"writer {i}".encode()))
    assert sum(w is True for w in won) == 1, won
    assert root.read_bytes("race.json") == f"writer {won.index(True)}".encode()


def test_jobs_split_units_and_never_share_one(root: CacheRoot, kit: Any) -> None:
    entry = new_entry(root, kit)
    a = Leases(root, entry.relpath, ttl_s=30)
    b = Leases(root, entry.relpath, ttl_s=30)
    assert a.claim_unit(entry) == 0
    assert b.claim_unit(entry) == 1  # 0 is held by a: b moves on
    assert a.claim_unit(entry, prefer=[3]) == 3
    assert b.claim_unit(entry) == 2
    assert a.claim_unit(entry) is None and b.claim_unit(entry) is None
    write(entry, 0)
    a.release_unit(0)
    assert b.claim_unit(entry) is None  # unit 0 is written: nothing left to claim


def test_concurrent_claims_give_each_unit_to_one_job(root: CacheRoot, kit: Any) -> None:
    entry = new_entry(root, kit)
    jobs = [Leases(root, entry.relpath, ttl_s=30) for _ in range(3)]
    got = race(3, lambda i: list(jobs[i].iter_units(entry)))
    flat = sorted(u for units in got for u in units)
    assert flat == list(range(entry.n_units)), got


def test_expired_claim_is_taken_over_and_the_old_owner_notices(root: CacheRoot, kit: Any) -> None:
    entry = new_entry(root, kit)
    crashed = Leases(root, entry.relpath, ttl_s=0.5)  # never entered: no heartbeat, like a
    for _ in range(entry.n_units):  # SIGKILLed job
        assert crashed.claim_unit(entry) is not None
    taker = Leases(root, entry.relpath, ttl_s=30, poll_s=0.05)
    assert taker.claim_unit(entry) is None  # first sight of each claim starts its ttl clock
    assert taker.wait_for_units(entry)  # returns once a claim is seen unchanged for 0.5 s
    assert taker.claim_unit(entry) == 0
    assert root.exists(f"{entry.relpath}/{LEASES_DIR}/000000.0001.json")  # generation 1
    assert not crashed.holds_unit(0) and crashed.holds_unit(1)
    claim = json.loads(root.read_bytes(f"{entry.relpath}/{LEASES_DIR}/000000.0001.json"))
    assert claim["owner"]["token"] == taker.owner.token and claim["generation"] == 1


def test_heartbeat_keeps_a_claim_alive(root: CacheRoot, kit: Any) -> None:
    entry = new_entry(root, kit)
    ttl = 1.5
    with Leases(root, entry.relpath, ttl_s=ttl) as owner:
        for _ in range(entry.n_units):
            owner.claim_unit(entry)
        other = Leases(root, entry.relpath, ttl_s=ttl)
        path = f"{entry.relpath}/{LEASES_DIR}/000000.0000.json"
        beats = set()
        end = time.monotonic() + 2.5 * ttl
        while time.monotonic() < end:
            assert other.claim_unit(entry) is None
            beats.add(json.loads(root.read_bytes(path))["heartbeat"])
            time.sleep(0.1)
        assert len(beats) >= 3  # the counter moved while we watched
        assert all(owner.holds_unit(u) for u in range(entry.n_units))


def test_released_claims_are_taken_over_at_once(root: CacheRoot, kit: Any) -> None:
    entry = new_entry(root, kit)
    with Leases(root, entry.relpath, ttl_s=600) as stopped:
        assert stopped.claim_unit(entry) == 0
    # leaving the block (an error, Ctrl-C) marked the claim released
    assert Leases(root, entry.relpath, ttl_s=600).claim_unit(entry) == 0


def test_layout_is_created_by_one_job(
    root: CacheRoot, kit: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    created: list[int] = []
    real = writer_mod.create_layout

    def counting(*args: Any) -> dict[str, Any]:
        created.append(1)
        time.sleep(0.2)  # widen the window in which the others arrive
        return real(*args)

    monkeypatch.setattr(writer_mod, "create_layout", counting)
    entries = race(4, lambda i: new_entry(root, kit, lease_ttl_s=30))
    assert all(isinstance(e, FeatureEntry) for e in entries), entries
    assert len(created) == 1
    assert len({json.dumps(e.attrs, sort_keys=True) for e in entries}) == 1


def test_interrupted_layout_is_taken_over_after_expiry(root: CacheRoot, kit: Any) -> None:
    ids = kit.make_ids(N)
    key = kit.make_key(ids, poolings=tuple(DIMS))
    crashed = Leases(root, key.relpath(), ttl_s=0.3)
    assert crashed.try_claim("layout", 0)  # a job died while creating the layout
    root.write_bytes_atomic(f"{key.relpath()}/zarr.json", b'{"half": true}')
    entry = new_entry(root, kit, lease_ttl_s=30)
    assert entry.n_units == 4 and entry.pending_units() == [0, 1, 2, 3]
    assert root.exists(f"{key.relpath()}/{LEASES_DIR}/layout.0001.json")


def test_finalize_happens_once(root: CacheRoot, kit: Any) -> None:
    entry = new_entry(root, kit)
    for u in range(entry.n_units):
        write(entry, u)
    assert root.listdir(f"{entry.relpath}/{LEASES_DIR}")  # the layout claim
    openers = [FeatureEntry.open(root, entry.relpath, allow_partial=True) for _ in range(4)]
    writers = [FeatureEntry(root, entry.relpath, o.attrs, writable=True) for o in openers]
    results = race(4, lambda i: writers[i].finalize({"job": i}))
    wins = [r for r in results if r is True]
    assert len(wins) == 1, results
    assert all(r is True or r is False or isinstance(r, EntryExistsError) for r in results)
    assert json.loads(root.read_bytes(f"{entry.relpath}/{COMPLETE_FILE}"))["job"] == (
        results.index(True)
    )
    assert not root.exists(f"{entry.relpath}/{LEASES_DIR}")  # claims are removed once complete


def test_live_claims(root: CacheRoot, kit: Any) -> None:
    entry = new_entry(root, kit)
    assert live_claims(root, entry.relpath) == []  # the layout claim was released
    job = Leases(root, entry.relpath, ttl_s=30)
    assert job.claim_unit(entry) == 0
    assert live_claims(root, entry.relpath) == [f"{entry.relpath}/{LEASES_DIR}/000000.0000.json"]
    write(entry, 0)
    assert live_claims(root, entry.relpath) == []  # its unit is written


def test_store_ignoring_conditional_writes_is_detected(
    root: CacheRoot, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    if root.is_local:
        pytest.skip("the probe is for object stores")
    assert Leases(root, "e.zarr", ttl_s=30)._conditional_ok()

    backend = root.backend

    def ignoring(path: str, data: bytes, durable: bool = True) -> bool:
        backend.write_atomic(path, data)  # an S3 clone that drops If-None-Match
        return True

    monkeypatch.setattr(backend, "create_exclusive", ignoring)
    leases = Leases(root, "e.zarr", ttl_s=30)
    assert not leases._conditional_ok()
    assert "best-effort" in caplog.text


def test_resolve_ttl(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(TTL_ENV, raising=False)
    assert resolve_ttl() == 60.0
    monkeypatch.setenv(TTL_ENV, "2.5")
    assert resolve_ttl() == 2.5 and resolve_ttl(7) == 7.0
    monkeypatch.setenv(TTL_ENV, "soon")
    with pytest.raises(ConfigError, match="EMBEDKIT_LEASE_TTL"):
        resolve_ttl()
    with pytest.raises(ConfigError, match="--lease-ttl"):
        resolve_ttl(0)


def test_owner_names_the_process() -> None:
    a, b = Owner.this_process(), Owner.this_process(rank=1)
    assert a.pid == b.pid and a.token != b.token
    assert b.to_dict()["rank"] == 1 and "rank" not in a.to_dict()


def test_claim_of_a_dead_local_process_is_taken_over_at_once(root: CacheRoot, kit: Any) -> None:
    import subprocess
    import sys

    entry = new_entry(root, kit)
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], text=True,
                          capture_output=True, check=True)  # fmt: skip
    here = Owner.this_process()
    dead = Owner(here.host, int(gone.stdout), "f" * 32, machine=here.machine)
    elsewhere = Owner("other-host", int(gone.stdout), "e" * 32, machine="another-machine")
    if here.machine is None:
        pytest.skip("no Linux boot id / pid namespace here: only the ttl applies")
    assert Leases(root, entry.relpath, ttl_s=600, owner=elsewhere).claim_unit(entry, [1]) == 1
    assert Leases(root, entry.relpath, ttl_s=600, owner=dead).claim_unit(entry) == 0
    taker = Leases(root, entry.relpath, ttl_s=600)
    # unit 0's owner ran here and is gone: no wait; unit 1's may live on another machine
    assert taker.claim_unit(entry) == 0
    assert taker.claim_unit(entry) == 2
    assert live_claims(root, entry.relpath) == [
        f"{entry.relpath}/{LEASES_DIR}/000000.0001.json",
        f"{entry.relpath}/{LEASES_DIR}/000001.0000.json",
        f"{entry.relpath}/{LEASES_DIR}/000002.0000.json",
    ]


def test_create_exclusive_without_hard_links(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno
    import os

    def no_links(src: Any, dst: Any) -> None:
        raise OSError(errno.EPERM, "hard links not supported")

    monkeypatch.setattr(os, "link", no_links)
    root = CacheRoot.from_uri(tmp_path / "c")
    won = race(6, lambda i: root.create_exclusive("race.json", f"writer {i}".encode()))
    assert sum(w is True for w in won) == 1, won
    assert root.read_bytes("race.json") == f"writer {won.index(True)}".encode()
    assert sorted(os.listdir(tmp_path / "c")) == [".race.json.excl", "race.json"]
