"""Reuse under torchrun: 2 CPU ranks split the copied and the computed units."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from embedkit.data.demo import DemoSpec, generate_demo
from embedkit.store import CacheRoot, FeatureEntry, list_entries
from embedkit.study.demodata import demo_dataset_config

from ..conftest import cli_env
from ..distributed.conftest import extract_args, run, torchrun

pytestmark = pytest.mark.slow


def test_two_ranks_copy_and_compute_like_one_fresh_process(
    model_cache: Path, tmp_path: Path
) -> None:
    env = cli_env(model_cache)
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR"):
        env.pop(var, None)
    data = tmp_path / "data"
    generate_demo(data, DemoSpec(n_patients=4, images_per_patient=3, size=128))
    doc = {"cache": "unused", "datasets": {"demo": demo_dataset_config()}}
    (data / "manifest.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    model = "test/tiny-dinov3-vit"
    cache, fresh = tmp_path / "cache", tmp_path / "fresh"
    run([sys.executable, "-m", "embedkit", *extract_args(model, data, cache)], env)  # 12
    generate_demo(data, DemoSpec(n_patients=8, images_per_patient=3, size=128))  # 24
    out = run(torchrun(2, extract_args(model, data, cache)), env).stdout
    assert "12 images computed, 12 copied from 1 entry" in out and "on 2 ranks" in out
    run([sys.executable, "-m", "embedkit", *extract_args(model, data, fresh, "--no-reuse")], env)

    root, fresh_root = CacheRoot.from_uri(str(cache)), CacheRoot.from_uri(str(fresh))
    (expected,) = [FeatureEntry.open(fresh_root, s.relpath) for s in list_entries(fresh_root)]
    got = FeatureEntry.open(root, expected.relpath)
    assert got.attrs["provenance"]["reuse"]["rows_copied"] == 12
    for pooling in ("cls", "mean"):
        np.testing.assert_array_equal(got.read(pooling), expected.read(pooling))
