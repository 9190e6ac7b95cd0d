"""Feature store throughput against np.save / np.load, side by side in one run.

    python benchmarks/bench_store.py                    # 200,000 x 1024 float16, ~1-2 min
    python benchmarks/bench_store.py --rows 20000       # quick check

For each configuration the same matrix is written through ``FeatureEntry.write_unit`` (all
units, in order, sha256 checksums and NaN/overflow checks included) + ``finalize`` and read back
with ``read("cls")`` from a local temporary root; the baseline is ``np.save`` + ``np.load`` of the
same array to the same filesystem. Both run with a warm page cache (every file is read right
after it was written, nothing is dropped), so the comparison is fair but flatters both; take the
best of ``--repeat`` runs. Temporary data is deleted at the end.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import zarr

from embedkit.store import CacheKey, CacheRoot, FeatureEntry, canonical_json, digest_ids


def best_of(repeat: int, fn: Callable[[], object]) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--unit-rows", type=int, nargs="+", default=[16384])
    ap.add_argument("--compression", nargs="+", default=["zstd", "none"])
    ap.add_argument("--concurrency", type=int, default=10, help="zarr async.concurrency")
    ap.add_argument(
        "--workers", type=int, default=0, help="zarr threading.max_workers (0: zarr's default)"
    )
    ap.add_argument("--tmp", default=None, help="directory for temporary data")
    args = ap.parse_args()

    zarr.config.set(
        {"async.concurrency": args.concurrency, "threading.max_workers": args.workers or None}
    )
    n, d = args.rows, args.dim
    rng = np.random.default_rng(0)
    data = rng.standard_normal((n, d), dtype=np.float32).astype(np.float16)
    gb = data.nbytes / 1e9
    ids = [f"img{i:07d}" for i in range(n)]
    tmp = Path(tempfile.mkdtemp(prefix="embedkit-bench-", dir=args.tmp))
    print(f"matrix {n} x {d} float16 = {data.nbytes / 1e6:.0f} MB raw; tmp {tmp}")
    try:
        npy = tmp / "baseline.npy"
        t_save = best_of(args.repeat, lambda: np.save(npy, data))
        t_load = best_of(args.repeat, lambda: np.load(npy))
        print(
            f"{'np.save / np.load':34s} write {gb / t_save:5.2f} GB/s   "
            f"read {gb / t_load:5.2f} GB/s   disk {npy.stat().st_size / 1e6:6.0f} MB"
        )
        for compression in args.compression:
            for unit_rows in args.unit_rows:
                t_w, t_r = [], []
                size = 0
                for rep in range(args.repeat):
                    root = CacheRoot.from_uri(tmp / f"root-{compression}-{unit_rows}-{rep}")
                    key = CacheKey(
                        dataset="bench",
                        model="bench/model",
                        weights="w",
                        resolution=224,
                        preprocessing=canonical_json({"rep": rep}),
                        compute_dtype="fp32",
                        storage_dtype="float16",
                        poolings=("cls",),
                        ids_digest=digest_ids(ids),
                        content_digest="0" * 64,
                        n_images=n,
                    )
                    entry = FeatureEntry.create_or_open(
                        root,
                        key,
                        ids=ids,
                        shapes={"cls": (d,)},
                        unit_rows=unit_rows,
                        provenance={},
                        compression=compression,
                    )
                    ones = np.ones(unit_rows, bool)
                    t = time.perf_counter()
                    for u in range(entry.n_units):
                        s, e = entry.unit_bounds(u)
                        entry.write_unit(u, {"cls": data[s:e]}, valid=ones[: e - s])
                    entry.finalize()
                    t_w.append(time.perf_counter() - t)
                    reader = FeatureEntry.open(root, key)
                    t = time.perf_counter()
                    out = reader.read("cls")
                    t_r.append(time.perf_counter() - t)
                    if rep == 0:
                        if not np.array_equal(out, data):
                            raise SystemExit("read back differs from what was written")
                        size = du(root.local_path / entry.relpath)  # type: ignore[operator]
                    shutil.rmtree(root.local_path)  # type: ignore[arg-type]
                w, r = min(t_w), min(t_r)
                label = f"FeatureEntry {compression} unit_rows={unit_rows}"
                print(
                    f"{label:34s} write {gb / w:5.2f} GB/s ({t_save / w:4.2f}x np.save)   "
                    f"read {gb / r:5.2f} GB/s ({t_load / r:4.2f}x np.load)   "
                    f"disk {size / 1e6:6.0f} MB ({size / data.nbytes:.3f} of raw)"
                )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
