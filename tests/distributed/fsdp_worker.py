"""Run under torchrun by test_dist_fsdp.py: shard a tiny encoder (default: the DINOv3 ViT),
encode, report per rank."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from embedkit.distributed import session
from embedkit.models import get_family, identify_encoder, load_encoder
from embedkit.models.sharding import load_sharded_encoder, resident_parameter_bytes


def main(out_dir: Path, model: str) -> None:
    identity = identify_encoder(model)
    poolings = tuple(p for p in get_family(identity.spec.family).stored_poolings if p != "patch")
    with session(torch.device("cpu")) as ctx:
        sharded = load_sharded_encoder(identity, ctx.mesh(), device=ctx.device, dtype="fp32")
        full = load_encoder(identity, device="cpu", dtype="fp32")
        # a different batch per rank: ranks process their own data through the shared shards
        pixels = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(ctx.rank))
        got = sharded.encode(pixels, poolings)
        want = full.encode(pixels, poolings)
        total = sum(p.numel() * p.element_size() for p in full.model.parameters())
        report = {
            "resident": resident_parameter_bytes(sharded.model),
            "total": total,
            "max_abs_diff": max((got[k] - want[k]).abs().max().item() for k in got),
        }
        (out_dir / f"rank{ctx.rank}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else "test/tiny-dinov3-vit")
