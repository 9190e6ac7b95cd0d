"""2-rank (torchrun, gloo) vs 1-process extraction throughput of a tiny model on this CPU.

Usage: python benchmarks/bench_distributed_cpu.py [--images 96] [--resolution 224]
Each run is a fresh cache; the figure is the engine's own img/s line (model load excluded).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from embedkit.data.demo import DemoSpec, generate_demo
from embedkit.study.demodata import demo_dataset_config


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=96)
    parser.add_argument("--resolution", type=int, default=224)
    parser.add_argument("--model", default="test/tiny-dinov3-vit")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        generate_demo(folder, DemoSpec(n_patients=args.images // 3, images_per_patient=3, size=256))
        doc = {"cache": "unused", "datasets": {"demo": demo_dataset_config()}}
        (folder / "manifest.yaml").write_text(yaml.safe_dump(doc))
        env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
        for nproc in (1, 2):
            cmd = [
                sys.executable, "-m", "embedkit", "extract", "--model", args.model,
                "--dataset", "demo", "--resolution", str(args.resolution), "--batch-size", "8",
                "--unit-rows", "16", "--workers", "0", "--device", "cpu",
                "--manifest", str(folder / "manifest.yaml"), "--cache", str(folder / f"c{nproc}"),
                "--nproc", str(nproc),
            ]  # fmt: skip
            out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
            rate = re.search(r"\(([\d.]+) img/s\)", out)
            print(f"{nproc} rank(s): {rate.group(1) if rate else '?'} img/s")


if __name__ == "__main__":
    main()
