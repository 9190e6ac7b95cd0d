"""benchmarks/gpu_check.sh: syntactically runnable, and a dry check (exit 0) without a GPU."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_check.sh"


def test_gpu_check_parses() -> None:
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the script runs the real check")
def test_gpu_check_without_gpu_says_so_and_exits_0() -> None:
    env = {**os.environ, "PYTHON": sys.executable}
    res = subprocess.run(
        ["bash", str(SCRIPT)], capture_output=True, text=True, env=env, timeout=120
    )
    assert res.returncode == 0, res.stderr
    assert "no CUDA GPU visible" in res.stdout
    assert "dry check" in res.stdout
