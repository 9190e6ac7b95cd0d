"""Fixtures shared across the test folders: demo data and its manifest, an isolated model cache,
the embedkit CLI as a subprocess, and a slow-enough local checkpoint."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from transformers import DINOv3ViTConfig, DINOv3ViTModel

from embedkit.data.demo import DemoSpec, generate_demo
from embedkit.study.demodata import demo_dataset_config


def write_manifest(folder: Path, cache: str = "cache", name: str = "manifest.yaml") -> Path:
    path = folder / name
    doc = {"cache": cache, "datasets": {"demo": demo_dataset_config()}}
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """24 images of 256 px, 8 patients, generated once per session."""
    folder = tmp_path_factory.mktemp("demo-data")
    generate_demo(folder, DemoSpec(n_patients=8, images_per_patient=3, size=256))
    return folder


@pytest.fixture
def demo_manifest(demo_data: Path, tmp_path: Path) -> Path:
    """A manifest over the shared demo images with a cache root private to the test."""
    return write_manifest(demo_data, cache=str(tmp_path / "cache"), name=f"{tmp_path.name}.yaml")


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """embedkit's model cache (tiny checkpoints, fingerprint memo) for the whole session."""
    return tmp_path_factory.mktemp("model-cache")


def cli_env(model_cache: Path) -> dict[str, str]:
    """Environment for `embedkit` subprocesses: offline, isolated caches, fixed threads."""
    env = dict(os.environ)
    env.update(
        {
            "XDG_CACHE_HOME": str(model_cache.parent / f"{model_cache.name}-xdg"),
            "HF_HUB_OFFLINE": "1",
            "OMP_NUM_THREADS": "1",
            "COLUMNS": "200",
        }
    )
    return env


def run_cli(
    args: list[str], env: dict[str, str], *, check: bool = True
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [sys.executable, "-m", "embedkit", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"embedkit {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="session")
def slow_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A local DINOv3 ViT checkpoint (random, seeded) big enough that extracting the small demo
    sets takes several seconds: long enough to kill a run in the middle of it."""
    folder = tmp_path_factory.mktemp("slow-model")
    torch.manual_seed(0)
    config = DINOv3ViTConfig(
        hidden_size=192,
        num_hidden_layers=4,
        num_attention_heads=3,
        intermediate_size=384,
        patch_size=16,
        num_register_tokens=4,
        image_size=224,
    )
    DINOv3ViTModel(config).save_pretrained(folder)
    return folder
