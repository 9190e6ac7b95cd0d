"""Several `embedkit extract` processes on one entry, on a local root and on S3 (moto).

Each process prints the units it computed ("units computed here: ..."); the tests check that
the processes together computed every unit exactly once, that one complete entry results, bit
identical to a single-process run, and that a SIGKILLed job's claims are taken over.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from embedkit.store import CacheRoot, FeatureEntry, list_entries, verify_root
from embedkit.store.layout import LEASES_DIR

from .conftest import S3Server

pytestmark = pytest.mark.slow

TTL_S = 2.0  # lease ttl of the jobs in these tests (EMBEDKIT_LEASE_TTL)
_UNITS = re.compile(r"units computed here: ([\d,]*) \((\d+) of (\d+)\)")


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """24 demo images and a manifest over them."""
    from embedkit.data.demo import DemoSpec, generate_demo
    from embedkit.study.demodata import demo_dataset_config

    folder = tmp_path_factory.mktemp("concurrency-data")
    generate_demo(folder, DemoSpec(n_patients=8, images_per_patient=3, size=256))
    doc = {"cache": "unused", "datasets": {"demo": demo_dataset_config()}}
    (folder / "manifest.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    return folder


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    out = dict(os.environ)
    out.update(
        {
            "XDG_CACHE_HOME": str(tmp_path_factory.mktemp("concurrency-xdg")),
            "HF_HUB_OFFLINE": "1",
            "OMP_NUM_THREADS": "1",
            "COLUMNS": "200",
            "EMBEDKIT_LEASE_TTL": str(TTL_S),
        }
    )
    return out


def _cmd(model: Path, demo: Path, cache: str) -> list[str]:
    return [
        sys.executable, "-m", "embedkit", "extract",
        "--model", str(model),
        "--dataset", "demo",
        "--resolution", "512",
        "--batch-size", "2",
        "--unit-rows", "2",
        "--workers", "0",
        "--device", "cpu",
        "--manifest", str(demo / "manifest.yaml"),
        "--cache", cache,
    ]  # fmt: skip


def _entry(root: CacheRoot) -> FeatureEntry:
    (summary,) = list_entries(root)
    return FeatureEntry.open(root, summary.relpath, allow_partial=True)


@pytest.fixture(scope="module")
def reference(
    slow_model: Path, demo: Path, env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> FeatureEntry:
    """The entry one uncontended process writes."""
    cache = tmp_path_factory.mktemp("concurrency-reference")
    done = subprocess.run(
        _cmd(slow_model, demo, str(cache)), env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return _entry(CacheRoot.from_uri(cache))


def _computed(stdout: str) -> list[int]:
    """The units a process reports it computed ([] if it found the entry complete)."""
    m = _UNITS.search(stdout)
    if m is None:
        assert "found" in stdout, stdout
        return []
    return [int(u) for u in m.group(1).split(",") if u]


def _cache(
    backend: str, env: dict[str, str], tmp_path: Path, request: pytest.FixtureRequest
) -> tuple[str, dict[str, str]]:
    """A fresh cache root URI for ``backend`` and the environment its jobs need."""
    if backend == "local":
        return str(tmp_path / "shared"), env
    server: S3Server = request.getfixturevalue("s3_server")
    return server.new_uri(), {**env, **server.env}


def _same_features(entry: FeatureEntry, reference: FeatureEntry) -> None:
    assert entry.is_complete and entry.key == reference.key
    for pooling in ("cls", "mean"):
        np.testing.assert_array_equal(entry.read(pooling), reference.read(pooling))


@pytest.mark.parametrize("backend", ["local", "s3"])
def test_three_processes_compute_each_unit_once(
    backend: str,
    slow_model: Path,
    demo: Path,
    env: dict[str, str],
    reference: FeatureEntry,
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> None:
    uri, env = _cache(backend, env, tmp_path, request)
    cmd = _cmd(slow_model, demo, uri)
    procs = [
        subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(3)
    ]
    outputs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], outputs
    per_job = [_computed(out) for out, _ in outputs]
    counts = Counter(u for units in per_job for u in units)
    assert sorted(counts) == list(range(reference.n_units)), per_job  # every unit computed ...
    assert set(counts.values()) == {1}, per_job  # ... by exactly one process
    print(f"{backend}: units per job {per_job}")  # how the jobs split the work (pytest -s)

    root = CacheRoot.from_uri(uri)
    entry = _entry(root)
    _same_features(entry, reference)
    assert verify_root(root) == {entry.relpath: []}
    assert entry.root.listdir(f"{entry.relpath}/{LEASES_DIR}") == []  # removed on completion
    records = [entry.unit_record(u)["writer"]["pid"] for u in range(entry.n_units)]
    by_pid = {p.pid: units for p, units in zip(procs, per_job, strict=True)}
    assert all(u in by_pid[pid] for u, pid in enumerate(records))  # records agree with logs


@pytest.mark.parametrize("backend", ["local", "s3"])
def test_stalled_job_is_taken_over_after_its_lease_expires(
    backend: str,
    slow_model: Path,
    demo: Path,
    env: dict[str, str],
    reference: FeatureEntry,
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> None:
    """A job frozen mid-run (SIGSTOP: alive, but its heartbeat stops, like a hung or
    partitioned machine) loses its claims after their ttl; another job finishes the entry, and
    the frozen job, woken afterwards, writes nothing it no longer holds."""
    uri, env = _cache(backend, env, tmp_path, request)
    root = CacheRoot.from_uri(uri)
    cmd = _cmd(slow_model, demo, uri)
    pipes: dict[str, Any] = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True}
    victim = subprocess.Popen(cmd, env=env, **pipes)
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and victim.poll() is None:
            if list_entries(root) and len(_entry(root).done_units()) >= 2:
                break
            time.sleep(0.05)
        os.kill(victim.pid, signal.SIGSTOP)
        partial = _entry(root)
        written = sorted(partial.done_units())
        assert not partial.is_complete and 2 <= len(written) < partial.n_units
        held = [
            int(name[:6])
            for name in root.listdir(f"{partial.relpath}/{LEASES_DIR}")
            if name[:6].isdigit() and int(name[:6]) not in written
        ]
        assert held, "the frozen job held no claim on an unwritten unit"

        # The victim's claims declare a 2 s ttl. The taker runs with a 600 s ttl of its own:
        # a claim's expiry is judged by the ttl written in it, so it still waits only ~2 s.
        taker = subprocess.run(
            cmd, env={**env, "EMBEDKIT_LEASE_TTL": "600"}, capture_output=True, text=True,
            timeout=300,
        )  # fmt: skip
        assert taker.returncode == 0, taker.stdout + taker.stderr
        taken = _computed(taker.stdout)
        # the taker computed exactly what the frozen job had not written, its claims included
        assert sorted(taken) == [u for u in range(partial.n_units) if u not in written]
        assert set(held) <= set(taken)
        entry = _entry(root)
        _same_features(entry, reference)
        records_before_wake = {u: entry.unit_record(u) for u in range(entry.n_units)}
    finally:
        os.kill(victim.pid, signal.SIGCONT)
    out, err = victim.communicate(timeout=300)
    assert victim.returncode == 0, out + err
    # woken, the victim noticed its claims were taken over: it wrote no unit it lost
    assert Counter(_computed(out) + taken) == Counter(range(entry.n_units)), (out, taken)
    assert {u: entry.unit_record(u) for u in range(entry.n_units)} == records_before_wake
    assert verify_root(root) == {entry.relpath: []}
