"""Decode + resize throughput: embedkit's read_image + Preprocessing vs a bare baseline loop.

Writes synthetic 2048x2048 16-bit grayscale PNGs (smooth anatomy-like background, blobs and
noise) to a temporary directory, then times, in one process with one torch thread (what a
DataLoader worker gets):

* baseline: PIL open -> np.asarray (uint16) -> /65535 -> F.interpolate(bilinear, antialias) to
  512 -> replicate to 3 channels -> ImageNet normalisation;
* embedkit: ``Preprocessing(size=512)(read_image(path))``;

and, for reference, ``make_loader`` with 0 and 2 workers. Run:

    python benchmarks/bench_image_loading.py [--images 24] [--repeats 2]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from embedkit.data.dataset import ImageDataset, make_loader
from embedkit.data.readers import read_image
from embedkit.data.transforms import IMAGENET_MEAN, IMAGENET_STD, Preprocessing

SIDE = 2048
SIZE = 512


def write_images(folder: Path, count: int, seed: int = 0) -> list[Path]:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:SIDE, 0:SIDE].astype(np.float32) / SIDE
    paths = []
    for k in range(count):
        image = 20000 + 15000 * np.sin(3 * xx + k) * np.cos(2 * yy)
        for _ in range(6):
            cy, cx, r = rng.random(3) * (1.0, 1.0, 0.2)
            image += 12000 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (r * r + 1e-3))
        image += rng.normal(0, 300, image.shape)
        path = folder / f"img{k:03d}.png"
        Image.fromarray(np.clip(image, 0, 65535).astype(np.uint16)).save(path, compress_level=1)
        paths.append(path)
    return paths


def baseline(path: Path) -> torch.Tensor:
    with Image.open(path) as image:
        pixels = np.asarray(image)
    x = torch.from_numpy(pixels.astype(np.float32) / 65535.0)[None, None]
    x = F.interpolate(x, size=(SIZE, SIZE), mode="bilinear", antialias=True, align_corners=False)
    x = x[0].expand(3, -1, -1)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (x - mean) / std


def best_rate(function: Callable[[Path], torch.Tensor], paths: list[Path], repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for path in paths:
            function(path)
        best = min(best, time.perf_counter() - start)
    return len(paths) / best


def loader_rate(paths: list[Path], pre: Preprocessing, workers: int) -> float:
    dataset = ImageDataset([p.stem for p in paths], paths, pre)
    loader = make_loader(dataset, batch_size=8, num_workers=workers)
    start = time.perf_counter()
    count = sum(len(batch.ids) for batch in loader)
    return count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(1)
    pre = Preprocessing(size=SIZE)

    def embedkit(path: Path) -> torch.Tensor:
        return pre(read_image(path))

    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        paths = write_images(Path(tmp), args.images)
        size_mb = sum(p.stat().st_size for p in paths) / len(paths) / 1e6
        print(
            f"wrote {len(paths)} {SIDE}x{SIDE} 16-bit PNGs ({size_mb:.1f} MB each) "
            f"in {time.perf_counter() - start:.1f} s"
        )
        difference = (embedkit(paths[0]) - baseline(paths[0])).abs().max().item()
        print(f"max |embedkit - baseline| on one image: {difference:.2e}")
        base = embed = 0.0
        for _ in range(args.repeats):  # interleave so drift hits both alike
            base = max(base, best_rate(baseline, paths, 1))
            embed = max(embed, best_rate(embedkit, paths, 1))
        print(f"baseline loop (1 thread):           {base:6.2f} img/s  {1000 / base:6.1f} ms/img")
        print(f"read_image + Preprocessing (1 thr): {embed:6.2f} img/s  {1000 / embed:6.1f} ms/img")
        print(f"ratio embedkit / baseline:          {embed / base:6.2f}")
        for workers in (0, 2):
            rate = loader_rate(paths, pre, workers)
            print(f"make_loader num_workers={workers} (batch 8):  {rate:6.2f} img/s")


if __name__ == "__main__":
    main()
