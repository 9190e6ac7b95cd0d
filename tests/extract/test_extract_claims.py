"""The extraction engine and unit claims, in one process (several processes:
tests/store/test_store_concurrency.py)."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import embedkit.extract.runner as extract_mod
from embedkit.extract import ExtractionRequest, extract
from embedkit.store import CacheRoot, FeatureEntry
from embedkit.store.layout import COMPLETE_FILE, unit_record_name
from embedkit.store.lease import Leases


def _request(**kw: object) -> ExtractionRequest:
    base: dict[str, object] = {
        "model": "test/tiny-dinov3-vit",
        "dataset": "demo",
        "resolution": 64,
        "batch_size": 4,
        "num_workers": 0,
        "unit_rows": 4,
        "device": "cpu",
        "lease_ttl_s": 30.0,
    }
    base.update(kw)
    return ExtractionRequest(**base)  # type: ignore[arg-type]


def test_units_claimed_by_a_live_job_are_left_to_it(
    demo_manifest: Path, model_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reference = extract(
        _request(), manifest=demo_manifest, cache=tmp_path / "ref", model_cache_dir=model_cache
    ).entry
    root = CacheRoot.from_uri(tmp_path / "shared")
    # lay the entry out, then let "another job" (heartbeating) hold units 1 and 4
    first = extract(_request(), manifest=demo_manifest, cache=root.uri, model_cache_dir=model_cache)
    entry_path = first.entry.relpath
    root.remove_tree(f"{entry_path}/{COMPLETE_FILE}")
    for u in (1, 4):
        root.remove_tree(f"{entry_path}/{unit_record_name(u)}")
    entry = FeatureEntry.open(root, entry_path, allow_partial=True)
    assert entry.pending_units() == [1, 4]

    waiting = threading.Event()
    real_wait = Leases.wait_for_units

    def wait_for_units(self: Leases, entry: FeatureEntry, *args: Any) -> bool:
        waiting.set()  # the job found nothing to claim and now waits for the other job
        return real_wait(self, entry, *args)

    monkeypatch.setattr(Leases, "wait_for_units", wait_for_units)
    results: list[object] = []
    with Leases(root, entry_path, ttl_s=30) as other:
        assert other.claim_unit(entry) == 1 and other.claim_unit(entry) == 4
        job = threading.Thread(
            target=lambda: results.append(
                extract(
                    _request(), manifest=demo_manifest, cache=root.uri,
                    model_cache_dir=model_cache,
                )
            )
        )  # fmt: skip
        job.start()
        assert waiting.wait(timeout=120)
        assert entry.pending_units() == [1, 4] and not entry.is_complete
    # leaving the block released both claims: the job takes them over and finishes
    job.join(timeout=120)
    (result,) = results
    assert isinstance(result, extract_mod.ExtractionResult)
    assert sorted(result.units) == [1, 4] and not result.reused
    assert result.entry.is_complete
    np.testing.assert_array_equal(result.entry.read("cls"), reference.read("cls"))


def test_entry_with_every_unit_written_is_finalized_without_the_model(
    demo_manifest: Path, model_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = CacheRoot.from_uri(tmp_path / "c")
    first = extract(_request(), manifest=demo_manifest, cache=root.uri, model_cache_dir=model_cache)
    root.remove_tree(f"{first.entry.relpath}/{COMPLETE_FILE}")  # its writer died before finalize

    def boom(*_a: object, **_k: object) -> None:
        raise AssertionError("nothing is pending: the encoder must not be loaded")

    monkeypatch.setattr(extract_mod, "load_encoder", boom)
    again = extract(_request(), manifest=demo_manifest, cache=root.uri, model_cache_dir=model_cache)
    assert again.reused and again.computed_units == 0 and again.entry.is_complete
