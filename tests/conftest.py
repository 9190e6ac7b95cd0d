"""Fixtures shared across the test folders."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import DINOv3ViTConfig, DINOv3ViTModel


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
