"""Fixtures for torchrun tests: demo images, a manifest, isolated caches, a torchrun runner."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from embedkit.data.demo import DemoSpec, generate_demo
from embedkit.study.demodata import demo_dataset_config


@pytest.fixture(scope="session")
def dist_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """24 images of 256 px and a manifest over them (cache paths are given per run)."""
    folder = tmp_path_factory.mktemp("dist-data")
    generate_demo(folder, DemoSpec(n_patients=8, images_per_patient=3, size=256))
    doc = {"cache": "unused", "datasets": {"demo": demo_dataset_config()}}
    (folder / "manifest.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    return folder


@pytest.fixture(scope="session")
def dist_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Offline, one thread per process, a model cache private to this test session."""
    env = dict(os.environ)
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR"):
        env.pop(var, None)
    env.update(
        {
            "XDG_CACHE_HOME": str(tmp_path_factory.mktemp("dist-xdg")),
            "HF_HUB_OFFLINE": "1",
            "OMP_NUM_THREADS": "1",
            "COLUMNS": "200",
        }
    )
    return env


def torchrun(nproc: int, args: list[str]) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        # Standalone rendezvous on localhost:0: torchrun binds a free loopback port itself, so
        # concurrent test runs never race for a port picked in advance.
        "--standalone",
        "-m",
        "embedkit",
        *args,
    ]


def run(cmd: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr[-4000:]}")
    return proc


def extract_args(model: str, data: Path, cache: Path, *extra: str) -> list[str]:
    return [
        "extract",
        "--model", model,
        "--dataset", "demo",
        "--resolution", "64",
        "--batch-size", "2",
        "--unit-rows", "4",
        "--workers", "0",
        "--device", "cpu",
        "--manifest", str(data / "manifest.yaml"),
        "--cache", str(cache),
        *extra,
    ]  # fmt: skip
