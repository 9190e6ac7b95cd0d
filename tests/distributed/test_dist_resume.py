"""A rank killed mid-run leaves the entry resumable; one process then finishes it identically."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from embedkit.store.layout import UNITS_DIR

from .conftest import extract_args, run, torchrun
from .test_dist_extract import entry_at

pytestmark = pytest.mark.slow


def _children(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()]


def test_killed_rank_then_one_process_finishes_identically(
    slow_model: Path, dist_data: Path, dist_env: dict[str, str], tmp_path: Path
) -> None:
    def args(cache: Path) -> list[str]:  # the later --resolution wins over the helper's 64
        return [*extract_args(str(slow_model), dist_data, cache), "--resolution", "256"]

    reference, killed = tmp_path / "reference", tmp_path / "killed"
    run([sys.executable, "-m", "embedkit", *args(reference)], dist_env)
    job = subprocess.Popen(
        torchrun(2, args(killed)),
        env=dist_env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and job.poll() is None:
        if len(list(killed.glob(f"*/*/*.zarr/{UNITS_DIR}/*.json"))) >= 2:
            break
        time.sleep(0.01)
    workers = _children(job.pid)
    assert workers, "torchrun finished before a rank could be killed"
    os.kill(workers[-1], signal.SIGKILL)  # one rank dies; torchrun then stops the job
    job.wait(timeout=120)
    assert job.returncode != 0
    partial = entry_at(killed)
    assert not partial.is_complete and 2 <= len(partial.done_units()) < partial.n_units

    run([sys.executable, "-m", "embedkit", *args(killed)], dist_env)
    done, expected = entry_at(killed), entry_at(reference)
    assert done.is_complete and done.key == expected.key
    for pooling in ("cls", "mean"):
        np.testing.assert_array_equal(done.read(pooling), expected.read(pooling))
