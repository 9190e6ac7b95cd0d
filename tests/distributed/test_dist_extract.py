"""torchrun with 2 CPU ranks (gloo): equal features, disjoint and complete unit split."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from embedkit.store import CacheRoot, FeatureEntry, list_entries

from .conftest import extract_args, run, torchrun

pytestmark = pytest.mark.slow


def entry_at(cache: Path) -> FeatureEntry:
    root = CacheRoot.from_uri(str(cache))
    (summary,) = list_entries(root)
    return FeatureEntry.open(root, summary.relpath, allow_partial=True)


@pytest.mark.parametrize(
    ("model", "poolings"),
    [
        ("test/tiny-dinov3-vit", ("cls", "mean", "cls+mean")),
        ("test/tiny-dinov3-convnext", ("pooled", "mean")),
    ],
)
def test_two_ranks_equal_one_process_bit_identically(
    model: str,
    poolings: tuple[str, ...],
    dist_data: Path,
    dist_env: dict[str, str],
    tmp_path: Path,
) -> None:
    single, ranks = tmp_path / "single", tmp_path / "ranks"
    run([sys.executable, "-m", "embedkit", *extract_args(model, dist_data, single)], dist_env)
    out = run(torchrun(2, extract_args(model, dist_data, ranks)), dist_env).stdout
    assert out.count("wrote") == 1 and "on 2 ranks" in out  # only rank 0 reports
    assert "throughput:" in out

    one, two = entry_at(single), entry_at(ranks)
    assert two.is_complete and two.key == one.key
    for pooling in poolings:  # OMP_NUM_THREADS=1 and the same batches: tolerance 0
        np.testing.assert_array_equal(two.read(pooling), one.read(pooling))
    writers = [json.dumps(two.unit_record(u)["writer"]) for u in range(two.n_units)]
    # 24 images / 4 per unit = 6 units; each rank claims units itself (its share
    # sorted(pending)[r::2] first), so both ranks wrote some and the claims kept them disjoint
    assert two.n_units == 6 and len(writers) == 6
    assert len(set(writers)) == 2
    assert sorted(two.done_units()) == list(range(6))
