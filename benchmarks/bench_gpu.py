"""GPU throughput and MFU: ViT-B/16 and ConvNeXt-B at 224/512/1024, ViT-7B at 512 (bf16).

Usage: python benchmarks/bench_gpu.py [--steps 20] [--batch 32] [--compile]
Random-initialised real-size models (no download); forward only under inference_mode + autocast,
SDPA attention, channels_last for ConvNeXt. Prints images/s, TFLOP/s and MFU against the
device's bf16 peak (embedkit.models.throughput.PEAK_BF16_TFLOPS). Without a GPU it says so
and exits 0.
"""

from __future__ import annotations

import argparse
import time

import torch

from embedkit.models.throughput import (
    ModelShape,
    ThroughputReport,
    device_peak_tflops,
    flops_per_image,
)

CASES = [
    ("dinov3/vitb16", 224), ("dinov3/vitb16", 512), ("dinov3/vitb16", 1024),
    ("convnext-b", 224), ("convnext-b", 512), ("convnext-b", 1024),
    ("dinov3/vit7b16", 512),
]  # fmt: skip


def build(name: str) -> tuple[torch.nn.Module, ModelShape]:
    from transformers import (
        DINOv3ConvNextConfig,
        DINOv3ConvNextModel,
        DINOv3ViTConfig,
        DINOv3ViTModel,
    )

    if name == "convnext-b":
        cfg = DINOv3ConvNextConfig(hidden_sizes=[128, 256, 512, 1024], depths=[3, 3, 27, 3])
        model = DINOv3ConvNextModel(cfg)
        return model, ModelShape(89_000_000, 128, 36, 4, kind="convnet", gflops_224=31.0)
    if name == "dinov3/vit7b16":
        cfg = DINOv3ViTConfig(
            hidden_size=4096, num_hidden_layers=40, num_attention_heads=32,
            intermediate_size=8192, use_gated_mlp=True, num_register_tokens=4,
        )  # fmt: skip
    else:
        cfg = DINOv3ViTConfig(num_register_tokens=4)
    cfg._attn_implementation = "sdpa"
    with torch.device("meta"):
        model = DINOv3ViTModel(cfg)
    params = sum(p.numel() for p in model.parameters())
    model = DINOv3ViTModel(cfg) if params < 2e9 else model.to_empty(device="cuda")
    return model, ModelShape(params, cfg.hidden_size, cfg.num_hidden_layers, 16, 4)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--compile", action="store_true")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print(f"no CUDA device visible to torch {torch.__version__}: nothing to benchmark here")
        return
    device = torch.device("cuda")
    name, peak = device_peak_tflops(device)
    print(f"device: {name} (bf16 peak: {peak or 'unknown'} TFLOP/s)")
    for model_name, side in CASES:
        model, shape = build(model_name)
        model = model.to(device, torch.bfloat16).eval()
        if shape.kind == "convnet":
            model = model.to(memory_format=torch.channels_last)
        fwd = torch.compile(model) if args.compile else model
        batch = max(1, args.batch // (8 if model_name.endswith("7b16") else 1))
        x = torch.randn(batch, 3, side, side, device=device, dtype=torch.bfloat16)
        try:
            with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
                fwd(pixel_values=x)
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                for _ in range(args.steps):
                    fwd(pixel_values=x)
                torch.cuda.synchronize()
                seconds = time.perf_counter() - t0
        except torch.OutOfMemoryError:
            print(f"{model_name} @ {side}: out of memory at batch {batch}")
            continue
        finally:
            del model, fwd
            torch.cuda.empty_cache()
        rep = ThroughputReport(
            batch * args.steps, seconds, flops_per_image(shape, side), 1, name, peak
        )
        print(f"{model_name} @ {side} px, batch {batch}: {rep.render()}")


if __name__ == "__main__":
    main()
