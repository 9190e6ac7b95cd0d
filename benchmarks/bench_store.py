"""Feature store throughput against np.save / np.load, side by side in one run.

    python benchmarks/bench_store.py                    # 200,000 x 1024 float16, ~1-2 min
    python benchmarks/bench_store.py --rows 20000       # quick check

For each configuration (compression x fsync) the same matrix is written through
``FeatureEntry.begin_unit`` / ``PendingUnit.commit`` (all units in order, unit ``k + 1`` begun
before unit ``k`` is committed, as the extraction writer does when units queue up; crc32c
checksums, NaN/Inf/overflow checks and atomic unit records included) + ``finalize``, and read
back with ``read("cls")`` from a local temporary root: the default, checked read (every chunk
crc32c-summed and NaN/Inf-scanned on the pool thread that read it, joined per unit and compared
with the unit records), and once more with ``verify=False`` for the cost of the check.
Baselines on the same filesystem: ``np.save`` (page cache only, like the store with
``FSYNC=False``), ``np.save`` + ``fsync`` (as durable as the store's default), ``np.load``,
and a bare ``fallocate`` + ``os.write`` of the same bytes as the store's chunk files, one thread
(no checks, no checksums: what the engine adds to plain file writes).
``zarr-python`` rows run the same entries with the direct chunk engine switched off (the code
path of fsspec roots, and what local roots used before). All runs are interleaved, repetition by
repetition, and the best of ``--repeat`` is reported, since the machine is shared. Every timed
call starts with no dirty pages and with warm memory (untimed; see :func:`settle`). Everything
reads warm data (written just before, never dropped from the page cache). Temporary data is
deleted at the end.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

import embedkit.store.chunkio as chunkio
import embedkit.store.writer as writer_mod
from embedkit.store import CacheKey, CacheRoot, FeatureEntry, canonical_json, digest_ids
from embedkit.store.layout import LAST_USED_FILE, EntryLayout


def settle(nbytes: int = 0) -> None:
    """Put every timed call in the same memory and writeback state (untimed).

    * ``os.sync()``: Linux throttles a writer once dirty pages pile up (measured here: plain
      32 MB file writes went from ~11 ms to ~125 ms each with 0.8-1.3 GB dirty), so without it
      a write's speed depends on what the configuration before it left unwritten.
    * Touch ``nbytes`` of fresh memory and free it: this VM (Firecracker, virtio-balloon free
      page reporting) hands freed guest pages back to the host, and touching such a page again
      faults on the host. Measured: a first touch of 410 MB ran at 0.34-0.72 GB/s after a pause
      of 3-10 s and at 12.6 GB/s right after the same amount was freed. The page cache and
      output arrays of the timed call then reuse those pages instead of paying host faults,
      whoever runs first.
    """
    os.sync()
    if nbytes:
        warm = np.ones(nbytes, dtype=np.uint8)
        del warm


#: Bytes of memory :func:`settle` pre-touches before each timed call (set from the matrix size).
WARM_BYTES = 0


def timed(fn: Callable[[], object]) -> float:
    settle(WARM_BYTES)
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def du(path: Path) -> tuple[int, int]:
    """(apparent bytes, allocated bytes) of the files under ``path``."""
    stats = [p.stat() for p in path.rglob("*") if p.is_file()]
    return sum(s.st_size for s in stats), sum(s.st_blocks * 512 for s in stats)


def timed_cpu(fn: Callable[[], object]) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process, all threads) of one call."""
    settle(WARM_BYTES)
    c, t = time.process_time(), time.perf_counter()
    fn()
    return time.perf_counter() - t, time.process_time() - c


def best_of(fn: Callable[[], object], repeat: int) -> float:
    return min(timed(fn) for _ in range(repeat))


def codec_survey(data: np.ndarray, repeat: int) -> None:
    """Compressed size and speed of candidate codecs on one 32 MB slice (see the docstring)."""
    import numcodecs.blosc
    from numcodecs import Blosc
    from numcodecs.zstd import Zstd

    from embedkit.store.chunkio import POOL

    part = np.ascontiguousarray(data[:16384]).reshape(-1).view(np.uint8)
    nb = part.nbytes
    codecs: list[tuple[str, Any]] = [
        ("zstd level 1", Zstd(level=1)),
        ("zstd level 3", Zstd(level=3)),
    ]
    for cname, level in (("lz4", 5), ("zstd", 1), ("blosclz", 5)):
        for shuffle, sname in ((Blosc.SHUFFLE, "byte"), (Blosc.BITSHUFFLE, "bit")):
            codecs.append(
                (
                    f"blosc {cname}({level}) {sname}-shuffle",
                    Blosc(cname=cname, clevel=level, shuffle=shuffle, typesize=2),
                ),
            )
    print(f"codec survey on {nb / 1e6:.0f} MB (one thread each; Blosc with its own threads off):")
    numcodecs.blosc.use_threads = False  # one thread, as in zarr-python's worker threads
    for label, codec in codecs:
        enc = codec.encode(part)
        out = np.empty_like(part)
        te = best_of(lambda c=codec: c.encode(part), repeat)
        td = best_of(lambda c=codec, e=enc, o=out: c.decode(e, out=o), repeat)
        print(
            f"  {label:30s} size {len(enc) / nb:.3f} of raw   encode {nb / te / 1e9:5.2f} GB/s"
            f"   decode {nb / td / 1e9:5.2f} GB/s"
        )
    z = Zstd(level=1)
    pieces = np.array_split(part, 8)  # the store's 4 MB chunks of a 32 MB unit
    frames = [z.encode(p) for p in pieces]
    outs = [np.empty_like(p) for p in pieces]
    te = best_of(lambda: list(POOL.map(z.encode, pieces)), repeat)
    td = best_of(lambda: list(POOL.map(lambda f, o: z.decode(f, out=o), frames, outs)), repeat)
    print(
        f"  zstd level 1, 8 x 4 MB on the 2-thread pool: encode {nb / te / 1e9:5.2f} GB/s"
        f"   decode {nb / td / 1e9:5.2f} GB/s"
    )


def save_fsync(path: Path, data: np.ndarray) -> None:
    with open(path, "wb") as f:
        np.save(f, data)
        f.flush()
        os.fsync(f.fileno())


def write_files(directory: Path, data: np.ndarray, rows: int) -> None:
    """Write the matrix as files of ``rows`` rows each: the store's chunk files, bare."""
    directory.mkdir()
    for i, start in enumerate(range(0, data.shape[0], rows)):
        fd = os.open(directory / f"c.{i}.0", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
        try:
            view = memoryview(np.ascontiguousarray(data[start : start + rows])).cast("B")
            chunkio._preallocate(fd, view.nbytes)  # as the store and np.save do
            done = 0
            while done < view.nbytes:
                done += os.write(fd, view[done:])
        finally:
            os.close(fd)


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--unit-rows", type=int, default=16384)
    ap.add_argument("--compression", nargs="+", default=["none", "zstd"])
    ap.add_argument("--no-zarr", action="store_true", help="skip the zarr-python rows")
    ap.add_argument("--no-survey", action="store_true", help="skip the codec survey")
    ap.add_argument("--tmp", default=None, help="directory for temporary data")
    args = ap.parse_args()

    n, d = args.rows, args.dim
    rng = np.random.default_rng(0)
    data = rng.standard_normal((n, d), dtype=np.float32).astype(np.float16)
    gb = data.nbytes / 1e9
    global WARM_BYTES
    WARM_BYTES = 2 * data.nbytes + (256 << 20)  # page cache + output array + slack
    if not args.no_survey:
        codec_survey(data, args.repeat)
    ids = [f"img{i:07d}" for i in range(n)]
    chunk_rows = writer_mod.chunk_rows(args.unit_rows, d * 2, "none")  # the store's files
    configs = [(c, True, True) for c in args.compression]  # (compression, fsync, fast engine)
    configs += [(c, False, True) for c in args.compression]
    if not args.no_zarr:
        configs += [(c, False, False) for c in args.compression]
    times: dict[str, list[float]] = {}
    sizes: dict[str, tuple[int, int]] = {}
    cpu: dict[str, list[float]] = {}
    tmp = Path(tempfile.mkdtemp(prefix="embedkit-bench-", dir=args.tmp))
    print(f"matrix {n} x {d} float16 = {data.nbytes / 1e6:.0f} MB raw; tmp {tmp}")
    npy = tmp / "baseline.npy"
    real_layout = EntryLayout.chunk_layout
    try:
        for rep in range(args.repeat):
            # New files, like the store's: overwriting a file whose pages are still dirty
            # skips block allocation (np.save measured 2.6 GB/s into a new file here and up
            # to 6.8 GB/s over its own unflushed previous copy).
            npy.unlink(missing_ok=True)
            times.setdefault("np.save", []).append(timed(lambda: np.save(npy, data)))
            times.setdefault("np.load", []).append(timed(lambda: np.load(npy)))
            npy.unlink()
            times.setdefault("np.save+fsync", []).append(timed(lambda: save_fsync(npy, data)))
            sizes["np"] = du(tmp)
            npy.unlink()
            bare = tmp / f"bare-{rep}"
            wrote = timed(lambda b=bare: write_files(b, data, chunk_rows))
            times.setdefault("bare", []).append(wrote)
            shutil.rmtree(bare)
            for compression, fsync, fast in configs:
                label = f"{compression} {'fsync' if fsync else 'no-fsync'}" + (
                    "" if fast else " zarr-python"
                )
                writer_mod.FSYNC = fsync
                EntryLayout.chunk_layout = real_layout if fast else lambda self, name: None  # type: ignore[method-assign]
                root = CacheRoot.from_uri(tmp / f"root-{rep}")
                key = CacheKey(
                    dataset="bench",
                    model="bench/model",
                    weights="w",
                    resolution=224,
                    preprocessing=canonical_json({"label": label}),
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
                    unit_rows=args.unit_rows,
                    provenance={},
                    compression=compression,
                )
                ones = np.ones(entry.unit_rows, bool)

                def write(entry: FeatureEntry = entry, ones: np.ndarray = ones) -> None:
                    # as the extraction writer does when units queue up: begin unit k + 1,
                    # then commit unit k
                    pending = None
                    for u in range(entry.n_units):
                        s, e = entry.unit_bounds(u)
                        begun = entry.begin_unit(u, {"cls": data[s:e]}, valid=ones[: e - s])
                        if pending is not None:
                            pending.commit()
                        pending = begun
                    if pending is not None:
                        pending.commit()
                    entry.finalize()

                wall, cpu_s = timed_cpu(write)
                times.setdefault(f"{label} write", []).append(wall)
                cpu.setdefault(f"{label} write", []).append(cpu_s)
                # the once-a-day usage mark (a small durable write) is not what is measured:
                # made fresh here, untimed, so neither timed read writes it
                root.touch(f"{entry.relpath}/{LAST_USED_FILE}", min_interval_s=0)
                reader = FeatureEntry.open(root, key)
                out: list[np.ndarray] = []
                wall, cpu_s = timed_cpu(lambda r=reader, o=out: o.append(r.read("cls")))
                times.setdefault(f"{label} read", []).append(wall)
                cpu.setdefault(f"{label} read", []).append(cpu_s)
                if not np.array_equal(out[0], data):
                    raise SystemExit(f"{label}: read back differs from what was written")
                out.clear()
                reader = FeatureEntry.open(root, key)  # a new reader: nothing checked yet
                wall, cpu_s = timed_cpu(
                    lambda r=reader, o=out: o.append(r.read("cls", verify=False))
                )
                times.setdefault(f"{label} unchecked read", []).append(wall)
                cpu.setdefault(f"{label} unchecked read", []).append(cpu_s)
                out.clear()
                sizes[label] = du(root.local_path / entry.relpath)  # type: ignore[operator]
                shutil.rmtree(root.local_path / entry.relpath)  # type: ignore[operator]
    finally:
        EntryLayout.chunk_layout = real_layout  # type: ignore[method-assign]
        writer_mod.FSYNC = True
        shutil.rmtree(tmp, ignore_errors=True)

    best = {k: min(v) for k, v in times.items()}
    least_cpu = {k: min(v) for k, v in cpu.items()}
    print(
        f"best of {args.repeat}, unit_rows={args.unit_rows}; cpu = CPU seconds per GB "
        "(all threads; 2 cores give at most 2 CPU-s per wall second); disk = allocated "
        "(apparent) bytes"
    )
    print(
        f"{'np.save / np.load':30s} write {gb / best['np.save']:5.2f} GB/s   "
        f"read {gb / best['np.load']:5.2f} GB/s   disk {sizes['np'][1] / 1e6:6.0f} MB"
    )
    print(f"{'np.save + fsync':30s} write {gb / best['np.save+fsync']:5.2f} GB/s")
    print(
        f"{'bare writes of chunk files':30s} write {gb / best['bare']:5.2f} GB/s "
        f"({best['np.save'] / best['bare']:4.2f}x np.save; {chunk_rows} rows per file, "
        "no checks, no checksums, one thread)"
    )
    for compression, fsync, fast in configs:
        label = f"{compression} {'fsync' if fsync else 'no-fsync'}" + (
            "" if fast else " zarr-python"
        )
        w, r = best[f"{label} write"], best[f"{label} read"]
        vs_sync = f" {best['np.save+fsync'] / w:4.2f}x np.save+fsync" if fsync else ""
        cw, cr = least_cpu[f"{label} write"] / gb, least_cpu[f"{label} read"] / gb
        apparent, allocated = sizes[label]
        ru = best[f"{label} unchecked read"]
        print(
            f"{label:30s} write {gb / w:5.2f} GB/s ({best['np.save'] / w:4.2f}x np.save{vs_sync})"
            f" cpu {cw:4.2f}   checked read {gb / r:5.2f} GB/s ({best['np.load'] / r:4.2f}x "
            f"np.load) cpu {cr:4.2f}   unchecked read {best['np.load'] / ru:4.2f}x np.load   "
            f"disk {allocated / 1e6:4.0f} MB ({allocated / data.nbytes:.3f} of"
            f" raw; {apparent / 1e6:4.0f} MB apparent)"
        )


if __name__ == "__main__":
    main()
