"""One store test suite, every backend: each test taking ``root`` runs on local and memory://."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import fsspec
import numpy as np
import pytest

from embedkit.store import CacheKey, CacheRoot, canonical_json, digest_ids

BACKENDS = ["local", "memory"]


@pytest.fixture(params=BACKENDS)
def root(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[CacheRoot]:
    if request.param == "local":
        yield CacheRoot.from_uri(tmp_path / "cache")
        return
    name = f"embedkit-test-{uuid.uuid4().hex}"
    yield CacheRoot.from_uri(f"memory://{name}")
    fs = fsspec.filesystem("memory")
    if fs.exists(f"/{name}"):
        fs.rm(f"/{name}", recursive=True)


def _make_ids(n: int, prefix: str = "img") -> list[str]:
    return [f"{prefix}{i:05d}" for i in range(n)]


def _make_key(
    ids: list[str],
    *,
    poolings: tuple[str, ...] = ("cls", "mean"),
    storage_dtype: str = "float16",
    dataset: str = "demo",
    model: str = "test/tiny-vit",
    resolution: int = 64,
) -> CacheKey:
    return CacheKey(
        dataset=dataset,
        model=model,
        weights="0" * 40,
        resolution=resolution,
        preprocessing=canonical_json({"resize": "shorter", "mean": [0.485], "std": [0.229]}),
        compute_dtype="fp32",
        storage_dtype=storage_dtype,
        poolings=poolings,
        ids_digest=digest_ids(ids),
        content_digest=digest_ids([*ids, "sizes"]),
        n_images=len(ids),
    )


def _make_features(
    n: int, dims: dict[str, tuple[int, ...]], seed: int = 0
) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {p: rng.standard_normal((n, *shape)).astype(np.float32) for p, shape in dims.items()}


class Kit:
    """Builders shared by the store tests (a fixture, since test dirs are not packages)."""

    make_ids = staticmethod(_make_ids)
    make_key = staticmethod(_make_key)
    make_features = staticmethod(_make_features)


@pytest.fixture
def kit() -> type[Kit]:
    return Kit
