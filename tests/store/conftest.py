"""One store test suite, every backend: each test taking ``root`` runs on local, memory:// and
s3:// (a moto S3 server on 127.0.0.1, one per session, credentials from the environment).
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import fsspec
import numpy as np
import pytest

from embedkit.store import CacheKey, CacheRoot, canonical_json, digest_ids
from embedkit.store.layout import is_feature_array

BACKENDS = ["local", "memory", "s3"]
S3_BUCKET = "embedkit-test"


@dataclass(frozen=True)
class S3Server:
    """A running moto S3 server and the environment that points s3fs/boto at it."""

    endpoint_url: str
    bucket: str
    env: dict[str, str]

    def new_uri(self) -> str:
        return f"s3://{self.bucket}/{uuid.uuid4().hex[:12]}"


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """A moto S3 server bound to 127.0.0.1 for the session, with fake credentials in os.environ.

    The credentials reach s3fs the usual way (AWS_* variables); nothing passes them explicitly.
    """
    pytest.importorskip("s3fs")
    moto_server = pytest.importorskip("moto.server")
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    env = {
        "AWS_ACCESS_KEY_ID": "embedkit-test-key-id",
        "AWS_SECRET_ACCESS_KEY": "embedkit-test-secret-5f3a9c",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": endpoint,
    }
    with pytest.MonkeyPatch.context() as mp:
        for name, value in env.items():
            mp.setenv(name, value)
        for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "FSSPEC_S3_ENDPOINT_URL"):
            mp.delenv(name, raising=False)
        import s3fs

        s3fs.S3FileSystem.clear_instance_cache()
        s3fs.S3FileSystem().mkdir(S3_BUCKET)
        try:
            yield S3Server(endpoint_url=endpoint, bucket=S3_BUCKET, env=env)
        finally:
            _close_aiohttp_sessions()
            s3fs.S3FileSystem.clear_instance_cache()
            server.stop()


def _close_aiohttp_sessions() -> None:
    """Close s3fs's aiohttp sessions on fsspec's loop, or aiohttp complains at interpreter exit."""
    import gc

    import aiohttp
    from fsspec.asyn import get_loop, sync

    loop = get_loop()
    for obj in gc.get_objects():
        if type(obj) is aiohttp.ClientSession and not obj.closed:
            sync(loop, obj.close)


@pytest.fixture(params=BACKENDS)
def root(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[CacheRoot]:
    if request.param == "local":
        yield CacheRoot.from_uri(tmp_path / "cache")
        return
    if request.param == "s3":
        server: S3Server = request.getfixturevalue("s3_server")
        s3_root = CacheRoot.from_uri(server.new_uri())
        yield s3_root
        if s3_root.exists(""):
            s3_root.backend.delete("")
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


def _stored_files(directory: Path) -> dict[str, bytes]:
    """Relative path -> bytes of every file under ``directory`` except Zarr metadata."""
    return {
        str(p.relative_to(directory)): p.read_bytes()
        for p in sorted(directory.rglob("*"))
        if p.is_file() and p.name != "zarr.json"
    }


def _feature_files(entry_dir: Path) -> dict[str, bytes]:
    """:func:`_stored_files` of every feature array of an entry (all arrays but ids and mask)."""
    return {
        f"{d.name}/{path}": data
        for d in sorted(entry_dir.iterdir())
        if d.is_dir() and is_feature_array(d.name)
        for path, data in _stored_files(d).items()
    }


class Kit:
    """Builders shared by the store tests (a fixture, since test dirs are not packages)."""

    make_ids = staticmethod(_make_ids)
    make_key = staticmethod(_make_key)
    make_features = staticmethod(_make_features)
    stored_files = staticmethod(_stored_files)
    feature_files = staticmethod(_feature_files)


@pytest.fixture
def kit() -> type[Kit]:
    return Kit
