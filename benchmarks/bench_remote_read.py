"""Full-read throughput of one entry from a local S3 server (moto), from local disk, and through
the read-through local cache (``--local-cache``), cold and warm.

    python benchmarks/bench_remote_read.py                 # 50,000 x 1024 float16, ~1 min
    python benchmarks/bench_remote_read.py --rows 10000    # quick check

Writes one entry (``cls``, float16, ``--compression`` zstd (the figures in RESULTS.md; ``none`` is
the store's default since), ``--unit-rows`` rows per unit) to a local
temporary root, pushes it with ``copy_entry`` to a moto S3 server on 127.0.0.1 (started here,
fake credentials in the environment), then reads ``read("cls")`` in full from both roots,
``--repeat`` times interleaved, and reports the best of each and their ratio. The read-through
rows time ``open_local_copy`` (validation against the remote entry, plus the fetch and check of
every unit when cold) followed by the same full read of the local copy: "cold" starts from an
empty local cache directory each repeat, "warm" reuses the filled copy. moto runs in this
process (a thread sharing the GIL) and serves from memory, so the S3 figures are a floor for
the client-side cost of the fsspec/zarr path, not a prediction for a real S3 bucket over a
network. Requires ``pip install "moto[server]" s3fs``.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from _local_s3 import local_s3

from embedkit.store import (
    CacheKey,
    CacheRoot,
    FeatureEntry,
    canonical_json,
    copy_entry,
    digest_ids,
    open_local_copy,
)
from embedkit.store.entry import COMPRESSIONS


def build_entry(
    root: CacheRoot, rows: int, dim: int, unit_rows: int, compression: str
) -> FeatureEntry:
    ids = [f"img{i:07d}" for i in range(rows)]
    key = CacheKey(
        dataset="bench",
        model="bench/remote",
        weights="0" * 40,
        resolution=224,
        preprocessing=canonical_json({"resize": "shorter"}),
        compute_dtype="fp32",
        storage_dtype="float16",
        poolings=("cls",),
        ids_digest=digest_ids(ids),
        content_digest=digest_ids([*ids, "bench"]),
        n_images=rows,
    )
    entry = FeatureEntry.create_or_open(
        root,
        key,
        ids=ids,
        shapes={"cls": (dim,)},
        unit_rows=unit_rows,
        provenance={},
        compression=compression,
    )
    rng = np.random.default_rng(0)
    for u in range(entry.n_units):
        s, e = entry.unit_bounds(u)
        feats = rng.standard_normal((e - s, dim), dtype=np.float32)
        entry.write_unit(u, {"cls": feats}, valid=np.ones(e - s, bool))
    entry.finalize()
    return entry


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=50_000)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--unit-rows", type=int, default=4096)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--compression", choices=COMPRESSIONS, default="zstd")
    args = parser.parse_args()

    with local_s3() as bucket, tempfile.TemporaryDirectory(prefix="bench-remote-") as scratch:
        tmp = Path(scratch)
        local = CacheRoot.from_uri(tmp / "cache")
        remote = CacheRoot.from_uri(f"{bucket}/cache")
        entry = build_entry(local, args.rows, args.dim, args.unit_rows, args.compression)
        t = time.perf_counter()
        copy_entry(local, remote, entry.relpath)
        push_s = time.perf_counter() - t
        nbytes = args.rows * args.dim * 2
        names = ("local", "s3", "read-through cold", "read-through warm")
        best = dict.fromkeys(names, float("inf"))
        want = FeatureEntry.open(local, entry.relpath).read("cls")
        open_local_copy(FeatureEntry.open(remote, entry.relpath), tmp / "warm")  # fill once
        for r in range(args.repeat):
            for name in names:
                root = local if name == "local" else remote
                reader = FeatureEntry.open(root, entry.relpath)
                t = time.perf_counter()
                if name.startswith("read-through"):
                    where = tmp / ("warm" if name.endswith("warm") else f"cold{r}")
                    copy = open_local_copy(reader, where)
                    assert copy.state == ("warm" if name.endswith("warm") else "filled")
                    reader = copy.entry
                data = reader.read("cls")
                best[name] = min(best[name], time.perf_counter() - t)
                assert np.array_equal(data, want)
        print(
            f"entry: {args.rows} x {args.dim} float16 ({nbytes / 1e6:.0f} MB), "
            f"{entry.n_units} units of {args.unit_rows} rows, {args.compression}"
        )
        print(f"push local -> s3 (copy + verify): {push_s:.2f} s, {nbytes / push_s / 1e6:.0f} MB/s")
        for name, secs in best.items():
            print(f"full read {name:17s}: {secs:.3f} s, {nbytes / secs / 1e9:.2f} GB/s")
        print(f"ratio local / s3 throughput: {best['s3'] / best['local']:.1f}x")
        warm = best["read-through warm"]
        print(f"ratio read-through warm / s3 throughput: {best['s3'] / warm:.1f}x")
        print(f"ratio local / read-through warm throughput: {warm / best['local']:.2f}x")
        cold = best["read-through cold"]
        print(f"ratio read-through cold / s3 time: {cold / best['s3']:.1f}x")


if __name__ == "__main__":
    main()
