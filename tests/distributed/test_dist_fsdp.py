"""FSDP2 with 2 CPU ranks: half the parameter bytes per rank, features equal the replica."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from .conftest import extract_args, run, torchrun
from .test_dist_extract import entry_at

pytestmark = pytest.mark.slow

#: FSDP gathers the very same fp32 weights; only reduction order could differ. Observed: 0.
ATOL = 1e-6


@pytest.mark.parametrize(
    ("model", "spread"),
    [
        ("test/tiny-dinov3-vit", 0.05),
        # blocks from the family adapter: every block of every stage
        ("test/tiny-dinov3-convnext", 0.05),
        # transformers 5 saves ViT / ViT-MAE under their legacy key names: renamed on load.
        # FSDP splits dim 0, and the (1, 197, 32) position table (13% of this tiny model) has
        # one row, so one rank holds it whole: 57% / 43% here, not 50 / 50.
        ("test/tiny-vit", 0.10),
        ("test/tiny-vit-mae", 0.10),
    ],
)
def test_sharded_encoder_holds_half_the_weights_and_matches(
    model: str, spread: float, dist_env: dict[str, str], tmp_path: Path
) -> None:
    worker = Path(__file__).with_name("fsdp_worker.py")
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
        "--standalone",
        str(worker), str(tmp_path), model,
    ]  # fmt: skip
    run(cmd, dist_env)
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    total = reports[0]["total"]
    assert total > 100_000  # 42k (ViT) or 26k (ConvNeXt) fp32 parameters
    for rep in reports:
        assert (0.5 - spread) * total <= rep["resident"] <= (0.5 + spread) * total
        assert rep["max_abs_diff"] <= ATOL
    assert abs(sum(r["resident"] for r in reports) - total) <= 0.01 * total


def test_extract_with_shard_fsdp_equals_replica(
    dist_data: Path, dist_env: dict[str, str], tmp_path: Path
) -> None:
    model = "test/tiny-dinov3-vit"
    # 5 units over 2 ranks with --unit-rows 5: rank 0 has 3 units (6 batches), rank 1 has 2
    # units (4 batches + 2 dummy forwards): the uneven split must not hang the all-gathers.
    replica = extract_args(model, dist_data, tmp_path / "replica", "--unit-rows", "5")
    sharded = extract_args(model, dist_data, tmp_path / "fsdp", "--unit-rows", "5")
    run(torchrun(2, replica), dist_env)
    run(torchrun(2, [*sharded, "--shard", "fsdp"]), dist_env)
    a, b = entry_at(tmp_path / "replica"), entry_at(tmp_path / "fsdp")
    assert b.is_complete and a.key == b.key and b.n_units == 5
    for pooling in ("cls", "mean"):
        np.testing.assert_allclose(b.read(pooling), a.read(pooling), atol=ATOL, rtol=0)
