"""Extraction throughput: the whole pipeline vs a bare loop of forward passes.

Baseline (same run, same model, same batches): the images are decoded and preprocessed up front,
then timed as a bare loop of ``encoder.encode`` calls, which is the ceiling for the pipeline. The
pipeline is ``embedkit.extract.extract`` from PNG files on disk into a fresh cache entry:
decoding, resizing, the forward pass, pooling, float16 cast, checksums, zstd and the Zarr writes.
Target: >= 0.9 of the bare forward rate where compute dominates.

Run:  python benchmarks/bench_extract.py [--images 96] [--hidden 384] [--layers 6]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
import yaml
from transformers import DINOv3ViTConfig, DINOv3ViTModel

from embedkit.data.demo import DemoSpec, generate_demo
from embedkit.data.readers import read_image
from embedkit.data.transforms import Preprocessing
from embedkit.extract import ExtractionRequest, extract
from embedkit.manifest import load_manifest
from embedkit.models import load_encoder
from embedkit.study.demodata import demo_dataset_config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=96)
    parser.add_argument("--hidden", type=int, default=384)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--resolution", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        generate_demo(tmp / "data", DemoSpec(n_patients=args.images // 3, size=512))
        manifest = tmp / "data" / "manifest.yaml"
        manifest.write_text(
            yaml.safe_dump({"cache": "cache", "datasets": {"demo": demo_dataset_config()}})
        )
        torch.manual_seed(0)
        model_dir = tmp / "model"
        DINOv3ViTModel(
            DINOv3ViTConfig(
                hidden_size=args.hidden,
                num_hidden_layers=args.layers,
                num_attention_heads=args.hidden // 64,
                intermediate_size=4 * args.hidden,
                patch_size=16,
                num_register_tokens=4,
            )
        ).save_pretrained(model_dir)

        encoder = load_encoder(str(model_dir), cache_dir=tmp / "models")
        table = load_manifest(manifest).dataset("demo").load()
        pre = Preprocessing(size=args.resolution, mean=encoder.spec.mean, std=encoder.spec.std)
        pixels = torch.stack([pre(read_image(p)) for p in table.paths])
        batches = list(torch.split(pixels, args.batch_size))
        poolings = ("cls", "mean")
        encoder.encode(batches[0], poolings)  # warm-up with the real batch shape
        t0 = time.perf_counter()
        for batch in batches:
            encoder.encode(batch, poolings)
        bare = len(pixels) / (time.perf_counter() - t0)

        print(
            f"DINOv3 ViT hidden={args.hidden} layers={args.layers} @ {args.resolution}px, "
            f"{len(pixels)} images, batch {args.batch_size}, torch threads "
            f"{torch.get_num_threads()}"
        )
        print(f"bare forward loop (pre-loaded tensors): {bare:8.1f} img/s")
        for workers in (0, 1, 2):
            request = ExtractionRequest(
                model=str(model_dir),
                dataset="demo",
                resolution=args.resolution,
                batch_size=args.batch_size,
                num_workers=workers,
                unit_rows=32,
                device="cpu",
            )
            cache = tmp / f"cache-{workers}"
            t0 = time.perf_counter()
            extract(request, manifest=manifest, cache=cache, model_cache_dir=tmp / "models")
            rate = len(pixels) / (time.perf_counter() - t0)
            print(
                f"pipeline, {workers} loader workers:          {rate:8.1f} img/s  "
                f"ratio {rate / bare:.2f}"
            )


if __name__ == "__main__":
    main()
