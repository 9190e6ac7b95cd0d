"""Fixtures for finetuning tests: demo images, a manifest over them, an isolated model cache."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from embedkit.data.demo import DemoSpec, generate_demo
from embedkit.study.demodata import demo_dataset_config


@pytest.fixture(scope="session")
def ft_demo_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """24 images of 64 px, 8 patients (splits 60/20/20 by patient), generated once."""
    folder = tmp_path_factory.mktemp("ft-demo-data")
    generate_demo(folder, DemoSpec(n_patients=8, images_per_patient=3, size=64))
    return folder


@pytest.fixture(scope="session")
def ft_manifest(ft_demo_data: Path) -> Path:
    path = ft_demo_data / "ft-manifest.yaml"
    doc = {"cache": str(ft_demo_data / "cache"), "datasets": {"demo": demo_dataset_config()}}
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


@pytest.fixture(scope="session")
def ft_model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("ft-model-cache")
