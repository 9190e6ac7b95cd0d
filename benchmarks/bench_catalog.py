"""`embedkit cache ls` on an S3 root (moto) with and without the catalog index.

    python benchmarks/bench_catalog.py                  # 50 entries (45 complete, 5 partial)
    python benchmarks/bench_catalog.py --entries 200

Writes ``--entries`` small entries (12 x 8 float16, 3 units; every tenth left partial) to a
moto S3 server on 127.0.0.1 (started here, fake credentials in the environment), then lists the
root ``--repeat`` times, interleaved, three ways: without the index (every entry's metadata,
unit records and size read afresh), with the index absent (it is built and written), and with
a fresh index. Reports the best of each and the ratio to the no-index listing; all three must
return the same summaries. Requires ``pip install "moto[server]" s3fs``.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from _local_s3 import local_s3

from embedkit.store import CacheKey, CacheRoot, FeatureEntry, canonical_json, digest_ids
from embedkit.store.index import INDEX_PATH


def build(root: CacheRoot, i: int, *, complete: bool) -> None:
    ids = [f"img{j:04d}" for j in range(12)]
    key = CacheKey(
        dataset=f"ds{i % 5}",
        model=f"bench/m{i}",
        weights="0" * 40,
        resolution=224,
        preprocessing=canonical_json({"resize": "shorter"}),
        compute_dtype="fp32",
        storage_dtype="float16",
        poolings=("cls",),
        ids_digest=digest_ids(ids),
        content_digest=digest_ids([*ids, "bench"]),
        n_images=len(ids),
    )
    entry = FeatureEntry.create_or_open(
        root, key, ids=ids, shapes={"cls": (8,)}, unit_rows=4, provenance={}
    )
    rng = np.random.default_rng(i)
    for u in range(entry.n_units if complete else 1):
        s, e = entry.unit_bounds(u)
        feats = rng.standard_normal((e - s, 8), dtype=np.float32)
        entry.write_unit(u, {"cls": feats}, valid=np.ones(e - s, bool))
    if complete:
        entry.finalize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--entries", type=int, default=50)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    from embedkit.store import list_entries

    with local_s3() as bucket:
        root = CacheRoot.from_uri(f"{bucket}/catalog")
        for i in range(args.entries):
            build(root, i, complete=i % 10 != 9)
        n_complete = sum(i % 10 != 9 for i in range(args.entries))
        names = ("no index", "index absent (build)", "index fresh")
        best = dict.fromkeys(names, float("inf"))
        want = None
        for _ in range(args.repeat):
            for name in best:
                if name == "index absent (build)" and root.exists(INDEX_PATH):
                    root.remove_tree(INDEX_PATH)
                t = time.perf_counter()
                got = list_entries(root, use_index=name != "no index")
                best[name] = min(best[name], time.perf_counter() - t)
                want = got if want is None else want
                assert got == want, f"{name}: the listing differs"
        print(
            f"root: s3:// (moto on 127.0.0.1), {args.entries} entries "
            f"({n_complete} complete, {args.entries - n_complete} partial)"
        )
        base = best["no index"]
        for name, secs in best.items():
            print(f"cache ls, {name:21s}: {secs:.3f} s  ({base / secs:.1f}x vs no index)")


if __name__ == "__main__":
    main()
