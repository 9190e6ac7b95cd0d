"""Reuse through the CLI: a SIGKILL during a reuse-heavy extraction, `cache ls` / `cache gc`."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from embedkit.data.demo import DemoSpec, generate_demo
from embedkit.store import CacheRoot, FeatureEntry, list_entries
from embedkit.store.layout import UNITS_DIR
from embedkit.study.demodata import demo_dataset_config

from ..conftest import cli_env, run_cli

pytestmark = pytest.mark.slow


def _manifest(data: Path, cache: Path, name: str) -> Path:
    path = data / f"{name}.yaml"
    doc = {"cache": str(cache), "datasets": {"demo": demo_dataset_config()}}
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def _args(model: Path, manifest: Path, *more: str) -> list[str]:
    return [
        "extract", "--model", str(model), "--dataset", "demo", "--resolution", "512",
        "--batch-size", "2", "--unit-rows", "2", "--workers", "0", "--device", "cpu",
        "--manifest", str(manifest), *more,
    ]  # fmt: skip


def test_sigkill_during_a_reuse_heavy_extraction_resumes_to_the_same_bytes(
    slow_model: Path, model_cache: Path, tmp_path: Path
) -> None:
    env = cli_env(model_cache)
    data = tmp_path / "data"
    generate_demo(data, DemoSpec(n_patients=6, images_per_patient=3, size=256))
    cache = tmp_path / "cache"
    run_cli(_args(slow_model, _manifest(data, cache, "m")), env)  # 18 images
    root = CacheRoot.from_uri(str(cache))
    generate_demo(data, DemoSpec(n_patients=10, images_per_patient=3, size=256))  # 30
    reference = tmp_path / "reference"
    run_cli(_args(slow_model, _manifest(data, reference, "ref"), "--no-reuse"), env)

    proc = subprocess.Popen(
        [sys.executable, "-m", "embedkit", *_args(slow_model, _manifest(data, cache, "m"))],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    (first,) = [s.relpath for s in list_entries(root)]
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        written = [p for p in cache.glob(f"*/*/*.zarr/{UNITS_DIR}/*.json") if first not in str(p)]
        if len(written) >= 10:  # the 9 copied units and a computed one
            break
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "extraction finished before it could be killed"
    (partial,) = [s for s in list_entries(root) if not s.complete]
    assert 10 <= partial.units_done < 15

    resumed = run_cli(_args(slow_model, _manifest(data, cache, "m")), env)
    assert "copied" in resumed.stdout
    finished = FeatureEntry.open(root, partial.relpath)
    ref_root = CacheRoot.from_uri(str(reference))
    (expected,) = [FeatureEntry.open(ref_root, s.relpath) for s in list_entries(ref_root)]
    assert finished.key == expected.key and finished.is_complete
    for pooling in ("cls", "mean"):
        np.testing.assert_array_equal(finished.read(pooling), expected.read(pooling))
    assert finished.attrs["provenance"]["reuse"]["rows_copied"] == 18

    # The older snapshot is superseded: listed so, removed by gc --superseded after a dry run.
    listing = run_cli(["cache", "ls", "--cache", str(cache)], env).stdout
    assert "superseded" in listing
    dry = run_cli(["cache", "gc", "--superseded", "--dry-run", "--cache", str(cache)], env)
    assert "would remove 1 entries" in dry.stdout and "superseded by" in dry.stdout
    assert len(list_entries(root)) == 2
    run_cli(["cache", "gc", "--superseded", "--cache", str(cache)], env)
    assert [s.relpath for s in list_entries(root)] == [partial.relpath]
