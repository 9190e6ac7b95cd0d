"""Cost of per-unit claims (leases): writing an entry's units with and without claiming each.

    python benchmarks/bench_leases.py                  # 16 units of 1024 x (768 + 768) float16
    python benchmarks/bench_leases.py --units 8 --repeat 2

For a local root and an S3 root (a moto server on 127.0.0.1 started here, a thread of this
process), writes every unit of a fresh entry twice: once with ``write_unit`` alone (the
baseline), once as the extraction engine does with leases (``claim_unit`` before, ``holds_unit``
and ``release_unit`` around each write). Reports the best of ``--repeat`` runs, the claim cost per
unit and the ratio. moto serves from memory in-process, so S3 figures are client-side costs,
not a real bucket's latency. Requires ``pip install "moto[server]" s3fs``.
"""

from __future__ import annotations

import argparse
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
from _local_s3 import local_s3

from embedkit.store import CacheKey, CacheRoot, FeatureEntry, canonical_json, digest_ids
from embedkit.store.lease import Leases


def new_entry(root: CacheRoot, units: int, unit_rows: int, dim: int) -> FeatureEntry:
    rows = units * unit_rows
    ids = [f"img{i:07d}" for i in range(rows)]
    key = CacheKey(
        dataset="bench",
        model=f"bench/leases-{uuid.uuid4().hex[:8]}",
        weights="0" * 40,
        resolution=224,
        preprocessing=canonical_json({"resize": "shorter"}),
        compute_dtype="fp32",
        storage_dtype="float16",
        poolings=("cls", "mean"),
        ids_digest=digest_ids(ids),
        content_digest=digest_ids([*ids, "bench"]),
        n_images=rows,
    )
    shapes = {"cls": (dim,), "mean": (dim,)}
    return FeatureEntry.create_or_open(
        root, key, ids=ids, shapes=shapes, unit_rows=unit_rows, provenance={}
    )


def write_all(entry: FeatureEntry, feats: np.ndarray, *, claims: bool) -> float:
    valid = np.ones(entry.unit_rows, bool)
    t = time.perf_counter()
    if not claims:
        for u in range(entry.n_units):
            entry.write_unit(u, {"cls": feats, "mean": feats}, valid=valid)
        return time.perf_counter() - t
    with Leases(entry.root, entry.relpath, ttl_s=60) as leases:
        for u in leases.iter_units(entry):
            assert leases.holds_unit(u)
            entry.write_unit(u, {"cls": feats, "mean": feats}, valid=valid)
            leases.release_unit(u)
    return time.perf_counter() - t


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--units", type=int, default=16)
    parser.add_argument("--unit-rows", type=int, default=1024)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    with local_s3() as bucket, tempfile.TemporaryDirectory(prefix="bench-leases-") as scratch:
        tmp = Path(scratch)
        roots = {
            "local": CacheRoot.from_uri(tmp / "cache"),
            "s3": CacheRoot.from_uri(f"{bucket}/cache"),
        }
        feats = np.random.default_rng(0).standard_normal((args.unit_rows, args.dim))
        feats = feats.astype(np.float32)
        mb = args.units * args.unit_rows * args.dim * 2 * 2 / 1e6
        print(
            f"{args.units} units of {args.unit_rows} x ({args.dim} + {args.dim}) float16 "
            f"({mb:.0f} MB), best of {args.repeat}"
        )
        for name, root in roots.items():
            best = {False: float("inf"), True: float("inf")}
            for _ in range(args.repeat):
                for claims in (False, True):
                    entry = new_entry(root, args.units, args.unit_rows, args.dim)
                    best[claims] = min(best[claims], write_all(entry, feats, claims=claims))
            per_unit_ms = (best[True] - best[False]) / args.units * 1e3
            print(
                f"{name:5s}: write_unit only {best[False]:.3f} s, with claims {best[True]:.3f} s; "
                f"claim cost {per_unit_ms:.1f} ms/unit; ratio {best[True] / best[False]:.2f}x"
            )


if __name__ == "__main__":
    main()
