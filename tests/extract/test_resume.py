"""Kill-and-resume with a real SIGKILL (concurrent jobs: tests/store/test_store_concurrency.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from embedkit.store import CacheRoot, FeatureEntry, list_entries
from embedkit.store.layout import UNITS_DIR

from ..conftest import cli_env, run_cli, write_manifest

pytestmark = pytest.mark.slow


def _args(model: Path, manifest: Path, cache: Path) -> list[str]:
    return [
        "extract",
        "--model", str(model),
        "--dataset", "demo",
        "--resolution", "512",
        "--batch-size", "2",
        "--unit-rows", "4",
        "--workers", "0",
        "--device", "cpu",
        "--manifest", str(manifest),
        "--cache", str(cache),
    ]  # fmt: skip


def _entry(cache: Path) -> FeatureEntry:
    (summary,) = list_entries(CacheRoot.from_uri(str(cache)))
    return FeatureEntry.open(CacheRoot.from_uri(str(cache)), summary.relpath, allow_partial=True)


def test_sigkill_then_rerun_gives_bit_identical_features(
    demo_data: Path, slow_model: Path, model_cache: Path, tmp_path: Path
) -> None:
    manifest = write_manifest(demo_data, name=f"{tmp_path.name}.yaml")
    env = cli_env(model_cache)
    reference = tmp_path / "reference"
    run_cli(_args(slow_model, manifest, reference), env)

    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, "-m", "embedkit", *_args(slow_model, manifest, killed)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    units: list[Path] = []
    while time.monotonic() < deadline and proc.poll() is None:
        units = list(killed.glob(f"*/*/*.zarr/{UNITS_DIR}/*.json"))
        if len(units) >= 2:
            break
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "extraction finished before it could be killed"
    partial = _entry(killed)
    done_at_kill = len(partial.done_units())
    assert not partial.is_complete and 2 <= done_at_kill < partial.n_units

    resumed = run_cli(_args(slow_model, manifest, killed), env)
    assert "wrote" in resumed.stdout
    finished, expected = _entry(killed), _entry(reference)
    assert finished.is_complete and finished.key == expected.key
    for pooling in ("cls", "mean", "cls+mean"):
        np.testing.assert_array_equal(finished.read(pooling), expected.read(pooling))
    # The rerun computed only what was missing: units finished before the kill kept their writer.
    writers = {json.dumps(finished.unit_record(u)["writer"]) for u in range(finished.n_units)}
    assert len(writers) == 2
    assert run_cli(["cache", "verify", "--cache", str(killed)], env).returncode == 0
