"""--shard auto planner (real ViT-7B numbers), FLOPs vs the published table (docs/scale-out.md),
unit split, batch search."""

from __future__ import annotations

import pytest
import torch

from embedkit.distributed import assign_units, strip_option
from embedkit.errors import ShardingError
from embedkit.models.sharding import plan_memory
from embedkit.models.throughput import (
    ModelShape,
    ThroughputReport,
    flops_per_image,
    largest_batch,
    peak_tflops,
)

GB = 1e9
VIT7B = ModelShape(params=6_716_000_000, embed_dim=4096, layers=40, patch=16, registers=4)


@pytest.mark.parametrize("side", [224, 512, 1024])
@pytest.mark.parametrize("gb", [80, 40, 24])
@pytest.mark.parametrize("ranks", [1, 2])
def test_7b_bf16_batch8_is_replicated_on_24gb_and_up(side: int, gb: int, ranks: int) -> None:
    plan = plan_memory(VIT7B, side=side, batch_size=8, device_bytes=gb * GB, world_size=ranks)
    assert plan.mode == "replicate"
    assert 13.4 * GB <= plan.weights_bytes <= 13.5 * GB  # 13.4 GB in bf16 (the model card)


@pytest.mark.parametrize(("side", "per_rank_gb"), [(224, 9.1), (512, 10.0), (1024, 13.2)])
def test_7b_on_16gb_with_2_ranks_is_fsdp(side: int, per_rank_gb: float) -> None:
    plan = plan_memory(VIT7B, side=side, batch_size=8, device_bytes=16 * GB, world_size=2)
    assert plan.mode == "fsdp"
    assert plan.per_rank_bytes == pytest.approx(per_rank_gb * GB, rel=0.02)


def test_7b_on_one_16gb_device_is_an_error_that_says_what_to_do() -> None:
    with pytest.raises(ShardingError, match=r"Run with at least 2 ranks and --shard fsdp"):
        plan_memory(VIT7B, side=512, batch_size=8, device_bytes=16 * GB, world_size=1)


def test_7b_at_1024_with_a_big_batch_on_24gb_advises_a_smaller_batch() -> None:
    # batch 64 at 1024 px: ~34 GB of activations; neither replicas nor FSDP over 2 fit
    with pytest.raises(ShardingError, match=r"Lower --batch-size to 12 or less"):
        plan_memory(VIT7B, side=1024, batch_size=64, device_bytes=24 * GB, world_size=2)
    assert plan_memory(
        VIT7B, side=1024, batch_size=64, device_bytes=80 * GB, world_size=1
    ).mode == ("replicate")


VITB16 = ModelShape(params=86_000_000, embed_dim=768, layers=12, patch=16, registers=4)
VITB14 = ModelShape(params=86_000_000, embed_dim=768, layers=12, patch=14)
CONVNEXTB = ModelShape(89_000_000, 128, 36, 4, kind="convnet", gflops_224=31.0)


@pytest.mark.parametrize(
    ("shape", "side", "table"),
    [
        (VITB16, 224, 36e9), (VITB16, 512, 215e9), (VITB16, 1024, 1.32e12),
        (VIT7B, 224, 2.73e12), (VIT7B, 512, 14.5e12), (VIT7B, 1024, 66.1e12),
        (CONVNEXTB, 224, 31e9), (CONVNEXTB, 512, 160e9), (CONVNEXTB, 1024, 642e9),
        (VITB14, 224, 46e9), (VITB14, 504, 284e9), (VITB14, 1022, 1.96e12),
    ],
)  # fmt: skip
def test_flops_match_the_protocols_table(shape: ModelShape, side: int, table: float) -> None:
    assert flops_per_image(shape, side) == pytest.approx(table, rel=0.15)
    assert flops_per_image(shape, side) == pytest.approx(table, rel=0.03)  # in fact within 3%


def test_mfu_report() -> None:
    assert peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert peak_tflops("NVIDIA GeForce RTX 4090") == 165.0
    assert peak_tflops("NVIDIA L40S") == 362.0
    assert peak_tflops("Some Future GPU") is None
    # 55 img/s of ViT-7B at 512 on one H100 is ~800 TFLOP/s (14.5 TFLOPs per image)
    rep = ThroughputReport(550, 10.0, flops_per_image(VIT7B, 512), 1, "H100", 989.0)
    assert rep.tflops == pytest.approx(798, rel=0.01)
    assert rep.mfu == pytest.approx(798 / 989, rel=0.01)
    assert "MFU 80.7%" in rep.render()
    cpu = ThroughputReport(10, 1.0, 1e9, 2, "cpu", None)
    assert cpu.mfu is None and "no peak figure" in cpu.render()


def test_assign_units_is_disjoint_covering_and_deterministic() -> None:
    pending = [9, 3, 4, 0, 7, 1, 8]
    for world in (1, 2, 3, 5, 8):
        shares = [assign_units(pending, r, world) for r in range(world)]
        flat = sorted(u for share in shares for u in share)
        assert flat == sorted(pending)
        assert shares == [assign_units(list(reversed(pending)), r, world) for r in range(world)]
    assert assign_units(pending, 1, 2) == [1, 4, 8]
    with pytest.raises(ValueError, match="rank"):
        assign_units(pending, 2, 2)


def test_strip_option_removes_nproc_for_the_relaunch() -> None:
    args = ["extract", "--nproc", "2", "--model", "m", "--nproc=3", "-b", "4"]
    assert strip_option(args, "--nproc") == ["extract", "--model", "m", "-b", "4"]


def test_largest_batch_backs_off_on_oom() -> None:
    tried: list[int] = []

    def fits_up_to_40(n: int) -> None:
        tried.append(n)
        if n > 40:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    assert 36 <= largest_batch(fits_up_to_40, start=8, limit=512) <= 40
    assert tried[:4] == [8, 16, 32, 64]
    assert largest_batch(fits_up_to_40, start=256, limit=512) in range(36, 41)
    assert largest_batch(fits_up_to_40, start=8, limit=24) == 24

    def never(n: int) -> None:
        raise torch.OutOfMemoryError("CUDA out of memory")

    with pytest.raises(torch.OutOfMemoryError):
        largest_batch(never, start=4)

    def broken(n: int) -> None:
        raise RuntimeError("shape mismatch")

    with pytest.raises(RuntimeError, match="shape mismatch"):
        largest_batch(broken, start=4)
