"""Time `load_manifest` + `check_dataset` on a 120,000-row NIH-style index.

Baseline, in the same run: a bare ``pandas.read_csv`` of the same file.

    python benchmarks/bench_manifest_check.py [--rows 120000] [--patients 30000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from embedkit.manifest import DatasetReport, check_dataset, load_manifest

FINDINGS = [
    "Atelectasis",
    "Cardiomegaly",
    "Effusion",
    "Infiltration",
    "Mass",
    "Nodule",
    "Pneumonia",
    "Pneumothorax",
    "Consolidation",
    "Edema",
    "Emphysema",
    "Fibrosis",
    "Pleural_Thickening",
    "Hernia",
]


def write_index(folder: Path, rows: int, patients: int, seed: int = 0) -> Path:
    """An NIH ChestX-ray14-like Data_Entry CSV: ~half 'No Finding', up to 4 findings otherwise."""
    rng = np.random.default_rng(seed)
    patient = np.sort(rng.integers(1, patients + 1, rows))
    n_findings = np.where(rng.random(rows) < 0.55, 0, rng.integers(1, 5, rows))
    picks = rng.random((rows, len(FINDINGS))).argsort(axis=1)
    labels = [
        "|".join(FINDINGS[j] for j in sorted(picks[i, :k])) if k else "No Finding"
        for i, k in enumerate(n_findings)
    ]
    frame = pd.DataFrame(
        {
            "Image Index": [f"{p:08d}_{i:03d}.png" for i, p in enumerate(patient)],
            "Finding Labels": labels,
            "Follow-up #": 0,
            "Patient ID": patient,
            "Patient Age": rng.integers(1, 95, rows),
            "View Position": rng.choice(["PA", "AP", "LL"], rows, p=[0.6, 0.38, 0.02]),
        }
    )
    path = folder / "Data_Entry_2017.csv"
    frame.to_csv(path, index=False)
    return path


def write_manifest(folder: Path) -> Path:
    entry = {
        "images": "./images",
        "index": "./Data_Entry_2017.csv",
        "id_column": "Image Index",
        "patient_column": "Patient ID",
        "filters": {"View Position": ["PA", "AP"]},
        "labels": {
            "format": "separated",
            "column": "Finding Labels",
            "separator": "|",
            "negative": "No Finding",
            "names": FINDINGS,
        },
        "splits": {"method": "patient", "fractions": {"train": 0.7, "val": 0.1, "test": 0.2}},
    }
    path = folder / "data_manifest.yaml"
    path.write_text(yaml.safe_dump({"datasets": {"nih-cxr14": entry}}, sort_keys=False))
    return path


def best_of(repeat: int, run: Callable[[], object]) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=120_000)
    parser.add_argument("--patients", type=int, default=30_000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        index = write_index(folder, args.rows, args.patients)
        manifest_path = write_manifest(folder)

        def ours() -> DatasetReport:
            return check_dataset(load_manifest(manifest_path).dataset("nih-cxr14"))

        baseline = best_of(args.repeat, lambda: pd.read_csv(index))
        names = pd.read_csv(index)["Image Index"].tolist()
        root = folder / "images"
        # the API hands out one pathlib.Path per image: the floor of any implementation
        path_floor = best_of(args.repeat, lambda: tuple(map(root.joinpath, names)))
        check = best_of(args.repeat, ours)
        report = ours()
    print(
        f"rows={args.rows} patients={args.patients} best of {args.repeat}; after the view "
        f"filter {report.images} images, {report.patients} patients, ok={report.ok}"
    )
    print(f"pandas.read_csv baseline:          {baseline:.3f} s")
    print(f"building {len(names)} pathlib.Paths:  {path_floor:.3f} s")
    print(f"load_manifest + check_dataset:     {check:.3f} s  ({check / baseline:.1f}x baseline)")


if __name__ == "__main__":
    main()
