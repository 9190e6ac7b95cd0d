"""Offline is a state of the run: an unreachable hub fails fast, once, with the guidance, and a
torchrun launch ends in one clean error (exit 2, no traceback)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from .conftest import cli_env, run_cli, write_manifest

pytestmark = pytest.mark.slow


def _unreachable(model_cache: Path) -> dict[str, str]:
    env = cli_env(model_cache)
    env.pop("HF_HUB_OFFLINE")
    for proxy in ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy"):
        env.pop(proxy, None)
    env["HF_ENDPOINT"] = "http://127.0.0.1:9"  # nothing listens: the connection is refused
    env["HF_HUB_CACHE"] = str(model_cache.parent / f"{model_cache.name}-empty-hub")
    return env


def test_extract_with_unreachable_hub_fails_fast_with_guidance(
    tmp_path: Path, model_cache: Path
) -> None:
    manifest = write_manifest(tmp_path)
    started = time.monotonic()
    result = run_cli(
        ["extract", "--model", "dinov3-7b", "-d", "demo", "-r", "224", "-m", str(manifest)],
        env=_unreachable(model_cache),
        check=False,
    )
    elapsed = time.monotonic() - started
    assert result.returncode == 2, result.stderr
    assert "cannot be reached" in result.stderr
    assert "hf download facebook/dinov3-vit7b16-pretrain-lvd1689m" in result.stderr
    assert "Traceback" not in result.stderr
    assert "Retry" not in result.stderr + result.stdout
    assert elapsed < 30  # the process start (torch import) included; the lookup itself < 5 s


def test_nproc_failure_is_one_clean_error(tmp_path: Path, model_cache: Path) -> None:
    manifest = write_manifest(tmp_path)
    result = run_cli(
        ["extract", "--model", "dinov3-7b", "-d", "demo", "-r", "224", "--nproc", "2",
         "--device", "cpu", "-m", str(manifest)],
        env=_unreachable(model_cache),
        check=False,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("error:") == 1
    assert "Traceback" not in result.stderr and "ChildFailedError" not in result.stderr


def test_a_failing_rank_ends_the_launch_with_exit_2_and_no_traceback(
    tmp_path: Path, model_cache: Path
) -> None:
    manifest = write_manifest(tmp_path)
    result = run_cli(
        ["extract", "--model", "test/tiny-dinov2", "-d", "nope", "-r", "224", "--nproc", "2",
         "--device", "cpu", "-m", str(manifest)],
        env=cli_env(model_cache),
        check=False,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert "no dataset 'nope'" in result.stderr
    assert "exited with status 2" in result.stderr
    assert "Traceback" not in result.stderr and "ChildFailedError" not in result.stderr
