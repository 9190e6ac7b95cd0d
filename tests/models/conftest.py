"""Fixtures for the encoder tests: no network, a private Hugging Face cache, tiny models once."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from embedkit.models import list_specs

TINY_NAMES = [spec.name for spec in list_specs() if spec.tiny_config is not None]


@pytest.fixture(autouse=True)
def offline_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test runs offline against an empty, private hub cache (huggingface_hub reads these
    settings at import time, so patch its constants as well as the environment)."""
    from huggingface_hub import constants

    hub_cache = tmp_path / "hf-hub"
    hub_cache.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(hub_cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub_cache))
    return hub_cache


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """embedkit cache root shared by the session, so each tiny model is built once."""
    return tmp_path_factory.mktemp("embedkit-cache")


def put_in_hub_cache(hub_cache: Path, hub_id: str, model: torch.nn.Module, commit: str) -> Path:
    """Lay ``model`` out as a Hugging Face cache snapshot of ``hub_id`` at ``commit``."""
    repo = hub_cache / ("models--" + hub_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    model.save_pretrained(snapshot)  # type: ignore[operator]
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    return snapshot


def write_config(directory: Path, config: dict[str, object]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config))
    return directory


@pytest.fixture
def pixels() -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    return torch.randn(2, 3, 224, 224, generator=generator)
