"""Probe benchmarks on embedding-like synthetic features (issue 5 "Done when").

Features: decaying spectrum (singular values ~ i^-0.8 after a random rotation), non-zero mean,
stored float16, 14 labels from a sparse logistic model, 5% of entries masked. Sections:

- ``linear``: ``LogisticProbe().fit_path`` (the default configuration: float64, preconditioned
  L-BFGS, 45 Cs = 10 ** linspace(-6, 5, 45), tol 1e-12, max_iter 1000) on ``--n`` x ``--d``
  training rows and ``--n-val`` validation rows. With ``--sk-labels > 0``, scikit-learn one-vs-rest
  ``LogisticRegression(C, max_iter=1000, tol=1e-12)`` (lbfgs, standardised features, cold start)
  is timed on the first ``--sk-labels`` labels at ``--sk-cs`` Cs spread evenly over the grid,
  extrapolated to 14 labels x 45 Cs (``--sk-labels 14 --sk-cs 45``: the full sweep, measured,
  no extrapolation), and its validation AUROCs are compared with the probe's on the same data.
  With ``--old-n > 0`` the previous solver (``precondition=False``) and the default are timed on a
  smaller ``--old-n`` x ``--old-d`` problem over every ``--old-every``-th C, in the same run.
- ``knn``: ``KNNProbe.kneighbors`` (k=20) vs faiss-cpu ``IndexFlatIP`` on L2-normalised float32
  copies (normalisation included in faiss' time), same neighbours checked.
- ``bootstrap``: ``bootstrap_ci`` macro AUROC, 1,000 resamples x 14 labels on ``--n-test`` rows.
- ``memory``: peak resident memory (VmHWM) of ``LogisticProbe(C=...)`` fitted on an
  ``--mem-n`` x ``--mem-d`` float16 matrix, in a fresh subprocess; with ``--mem-store DIR`` the
  matrix is a complete cache entry ("cls" + "mean", written there on first use) read by ids as
  the probe runner reads it, and the peak of that read is reported too.

    python benchmarks/bench_probes.py --section linear --n 20000 --sk-labels 2
    python benchmarks/bench_probes.py --section knn --n 100000 --queries 5000
    python benchmarks/bench_probes.py --section memory --mem-n 200000 --mem-d 8192 \
        --mem-iter 5 --mem-store /tmp/bench-store
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from embedkit.eval.metrics import per_label_auroc
from embedkit.probes import DINOV2_CS, KNNProbe, LogisticProbe


def feature_chunks(
    n: int, d: int, labels: int, seed: int = 0, chunk: int = 4096
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Embedding-like rows by chunks: (float16 features, {0,1} targets, mask).

    Decaying spectrum (singular values ~ i^-0.8), non-zero mean, a random rotation (generated in
    float32, stored float16): a dense one
    up to 2,048 dims, above that a random block-diagonal one (256-dim blocks after a random
    permutation of the spectrum), which keeps generating 200k x 8192 at a minute or two.
    """
    rng = np.random.default_rng(seed)
    block = d if d <= 2048 else 256
    if d % block:
        raise SystemExit(f"--d above 2048 must be a multiple of 256, got {d}")
    rot = np.stack([np.linalg.qr(rng.normal(size=(block, block)))[0] for _ in range(d // block)])
    rot = rot.astype(np.float32)
    spectrum = np.arange(1, d + 1) ** -0.8
    spectrum = (spectrum if block == d else rng.permutation(spectrum)).astype(np.float32)
    offset = rng.normal(size=d) * 0.5
    W = (rng.normal(size=(d, labels)) * (rng.random((d, labels)) < 0.05)).astype(np.float32)
    for lo in range(0, n, chunk):
        hi = min(n, lo + chunk)
        g = rng.standard_normal((hi - lo, d), dtype=np.float32) * spectrum
        g = g.reshape(hi - lo, d // block, block)
        z = np.matmul(g.transpose(1, 0, 2), rot.transpose(0, 2, 1)).transpose(1, 0, 2)
        z = z.reshape(hi - lo, d)
        logits = z @ W * 4.0 - 1.5
        y = (rng.random((hi - lo, labels)) < 1 / (1 + np.exp(-logits))).astype(np.float32)
        yield (z * 3.0 + offset).astype(np.float16), y, rng.random((hi - lo, labels)) > 0.05


def make_features(
    n: int, d: int, labels: int, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`feature_chunks` gathered into one float16 matrix (no (n, d) float64 temporary)."""
    X = np.empty((n, d), dtype=np.float16)
    y = np.empty((n, labels), dtype=np.float32)
    mask = np.empty((n, labels), dtype=bool)
    lo = 0
    for xc, yc, mc in feature_chunks(n, d, labels, seed):
        X[lo : lo + len(xc)], y[lo : lo + len(xc)], mask[lo : lo + len(xc)] = xc, yc, mc
        lo += len(xc)
    return X, y, mask


def bench_linear(args: argparse.Namespace) -> None:
    X, y, mask = make_features(args.n + args.n_val, args.d, args.labels)
    Xtr, ytr, mtr = X[: args.n], y[: args.n], mask[: args.n]
    Xva, yva, mva = X[args.n :], y[args.n :], mask[args.n :]
    Cs = DINOV2_CS
    print(f"linear: {args.n} x {args.d} float16 train, {args.n_val} val, {args.labels} labels")
    t0 = time.perf_counter()
    path = LogisticProbe(Cs=Cs).fit_path(Xtr, ytr, mtr, Xva, yva, mva)
    t_probe = time.perf_counter() - t0
    print(
        f"  LogisticProbe default, {Cs.size} Cs: {t_probe:.1f} s; L-BFGS iterations per C "
        f"(mean over labels) {np.round(path.n_iter.mean(1), 1).tolist()}; all converged: "
        f"{bool(path.converged.all())}; best C {path.Cs[int(np.nanargmax(path.score))]:.3g}, "
        f"val macro AUROC {np.nanmax(path.score):.4f}"
    )
    if args.sk_labels > 0:
        from sklearn.linear_model import LogisticRegression
        from sklearn.preprocessing import StandardScaler

        scaler = StandardScaler().fit(Xtr.astype(np.float64))
        Xs = scaler.transform(Xtr.astype(np.float64))
        Xvs = scaler.transform(Xva.astype(np.float64))
        pick = np.linspace(0, Cs.size - 1, args.sk_cs).round().astype(int)
        sk_time, max_delta, n_max_iter = 0.0, 0.0, 0
        for i in pick:
            t1 = time.perf_counter()
            proba = np.empty((Xva.shape[0], args.sk_labels))
            for j in range(args.sk_labels):
                rows = mtr[:, j]
                clf = LogisticRegression(C=Cs[i], max_iter=1000, tol=1e-12)
                clf.fit(Xs[rows], ytr[rows, j])
                n_max_iter += int(clf.n_iter_[0] >= 1000)
                proba[:, j] = clf.predict_proba(Xvs)[:, 1]
            dt = time.perf_counter() - t1
            sk_time += dt
            auc = per_label_auroc(yva[:, : args.sk_labels], mva[:, : args.sk_labels], proba)
            delta = float(np.abs(auc - path.scores[i, : args.sk_labels]).max())
            max_delta = max(max_delta, delta)
            print(f"  sklearn C={Cs[i]:.3g}: {dt:.1f} s, max |dAUROC| vs probe {delta:.2e}")
        factor = (Cs.size / pick.size) * (args.labels / args.sk_labels)
        sk_est = sk_time * factor
        how = (
            "the full sweep, measured"
            if factor == 1
            else f"extrapolated x{factor:.1f} to {args.labels} labels x {Cs.size} Cs: "
            f"{sk_est:.0f} s"
        )
        print(
            f"  sklearn OvR lbfgs {sk_time:.1f} s on {args.sk_labels} labels x {pick.size} Cs "
            f"({n_max_iter} of {args.sk_labels * pick.size} fits hit max_iter), {how}; ratio "
            f"sklearn / probe {sk_est / t_probe:.1f}x; max |dAUROC| {max_delta:.2e}"
        )
    if args.old_n > 0:
        Xo, yo, mo = make_features(args.old_n + 2000, args.old_d, args.labels, seed=1)
        sub = Cs[:: args.old_every]
        times = {}
        scores = {}
        for name, pre in (("previous (precondition=False)", False), ("default", "auto")):
            t1 = time.perf_counter()
            p = LogisticProbe(Cs=sub, precondition=pre).fit_path(
                Xo[: args.old_n], yo[: args.old_n], mo[: args.old_n],
                Xo[args.old_n :], yo[args.old_n :], mo[args.old_n :],
            )  # fmt: skip
            times[name] = time.perf_counter() - t1
            scores[name] = p.scores
            print(
                f"  {args.old_n} x {args.old_d}, {sub.size} Cs, {name}: {times[name]:.1f} s, "
                f"iterations per C {np.round(p.n_iter.mean(1), 1).tolist()}"
            )
        a, b = scores.values()
        print(
            f"  before / after: {times['previous (precondition=False)'] / times['default']:.1f}x,"
            f" max |dAUROC| {np.nanmax(np.abs(a - b)):.2e}"
        )


def bench_knn(args: argparse.Namespace) -> None:
    import faiss

    faiss.omp_set_num_threads(args.threads)
    X, y, mask = make_features(args.n + args.queries, args.d, args.labels)
    Xtr, Xq = X[: args.n], X[args.n :]
    knn = KNNProbe(k=20).fit(Xtr, y[: args.n], mask=mask[: args.n])
    t0 = time.perf_counter()
    _, idx = knn.kneighbors(Xq, 20)
    t_e = time.perf_counter() - t0
    t0 = time.perf_counter()
    a = Xtr.astype(np.float32)
    a /= np.linalg.norm(a, axis=1, keepdims=True)
    q = Xq.astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    index = faiss.IndexFlatIP(args.d)
    index.add(a)
    _, ref = index.search(q, 20)
    t_f = time.perf_counter() - t0
    same_sets = np.mean([len(set(u) & set(v)) / 20 for u, v in zip(idx, ref, strict=True)])
    print(
        f"knn k=20, {args.queries} queries x {args.n} x {args.d}: KNNProbe {t_e:.1f} s, faiss "
        f"IndexFlatIP {t_f:.1f} s, ratio {t_e / t_f:.2f}x faiss; identical ordered neighbours "
        f"{np.mean(idx == ref):.5f}, identical sets {same_sets:.5f}"
    )


def bench_bootstrap(args: argparse.Namespace) -> None:
    from embedkit.eval import bootstrap as B

    rng = np.random.default_rng(0)
    n = args.n_test
    y = (rng.random((n, args.labels)) < 0.1).astype(float)
    m = rng.random((n, args.labels)) > 0.05
    s = y + rng.normal(size=y.shape)
    t0 = time.perf_counter()
    idx = B.bootstrap_indices(n, 1000)
    ci = B.bootstrap_ci(y, m, s, "macro_auroc", idx)
    print(
        f"bootstrap 1000 x {args.labels} labels x {n} rows (indices + CI): "
        f"{time.perf_counter() - t0:.2f} s; {ci}"
    )


def _vm(key: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def _reset_hwm() -> None:
    with open("/proc/self/clear_refs", "w") as fh:  # VmHWM := VmRSS from here on
        fh.write("5")


def build_store_entry(directory: str, n: int, d: int, labels: int) -> None:
    """A complete cache entry of ``n`` images with "cls" and "mean" of ``d / 2`` dims each
    (read back as "cls+mean": the (n, d) float16 matrix of :func:`feature_chunks`), plus the
    targets in ``labels.npz``; written unit by unit, never held whole in memory."""
    from embedkit.store import CacheKey, CacheRoot, FeatureEntry, canonical_json, digest_ids

    ids = [f"img{i:07d}" for i in range(n)]
    key = CacheKey(
        dataset="bench", model="bench/probes", weights="0" * 40, resolution=224,
        preprocessing=canonical_json({"resize": "shorter"}), compute_dtype="fp32",
        storage_dtype="float16", poolings=("cls", "mean"), ids_digest=digest_ids(ids),
        content_digest=digest_ids([*ids, f"bench-probes-{d}"]), n_images=n,
    )  # fmt: skip
    half = d // 2
    entry = FeatureEntry.create_or_open(
        CacheRoot.from_uri(directory), key, ids=ids, shapes={"cls": (half,), "mean": (half,)},
        unit_rows=4096, provenance={},
    )  # fmt: skip
    ys, ms = [], []
    t0 = time.perf_counter()
    for u, (xc, yc, mc) in enumerate(feature_chunks(n, d, labels, chunk=4096)):
        entry.write_unit(
            u, {"cls": xc[:, :half], "mean": xc[:, half:]}, valid=np.ones(len(xc), bool)
        )
        ys.append(yc)
        ms.append(mc)
        print(f"\r  writing the store entry: unit {u + 1}/{entry.n_units}, "
              f"{time.perf_counter() - t0:.0f} s", end="", file=sys.stderr, flush=True)  # fmt: skip
    entry.finalize()
    np.savez(f"{directory}/labels.npz", y=np.concatenate(ys), mask=np.concatenate(ms))
    print(file=sys.stderr)


def memory_child(args: argparse.Namespace) -> None:
    """Runs in a fresh process: peak RSS (VmHWM) of loading the features and of fitting."""
    torch.set_num_threads(args.threads)
    out: dict[str, Any] = {}
    if args.mem_store:
        from embedkit.probes.features import read_features
        from embedkit.store import CacheRoot, find_entry, list_entries

        root = CacheRoot.from_uri(args.mem_store)
        entry = find_entry(root, list_entries(root)[0].relpath, allow_partial=False)
        lab = np.load(f"{args.mem_store}/labels.npz")
        y, mask = lab["y"], lab["mask"]
        import gc

        gc.collect()
        out["base"] = _vm("VmRSS")
        _reset_hwm()
        t0 = time.perf_counter()
        X = read_features(entry, "cls+mean", list(entry.ids))  # as the probe runner reads
        out["read_seconds"] = time.perf_counter() - t0
        out["read_hwm"] = _vm("VmHWM")
    else:
        X, y, mask = make_features(args.mem_n, args.mem_d, args.labels)
        import gc

        gc.collect()
        out["base"] = _vm("VmRSS") - X.nbytes  # the process without the features
    if args.mem_iter == 0:  # the read only
        print(json.dumps({**out, "shape": list(X.shape), "nbytes": X.nbytes}))
        return
    _reset_hwm()  # data generation / loading is not part of the fit's figure
    t0 = time.perf_counter()
    probe = LogisticProbe(C=args.mem_c, max_iter=args.mem_iter).fit(X, y, mask=mask)
    out.update(
        shape=list(X.shape),
        nbytes=X.nbytes,
        hwm=_vm("VmHWM"),
        seconds=time.perf_counter() - t0,
        iters=probe.n_iter_.tolist(),
        converged=probe.converged_.tolist(),
    )
    print(json.dumps(out))


def bench_memory(args: argparse.Namespace) -> None:
    if args.mem_store:
        from embedkit.store import CacheRoot, list_entries

        if not list_entries(CacheRoot.from_uri(args.mem_store)):
            build_store_entry(args.mem_store, args.mem_n, args.mem_d, args.labels)
    cmd = [sys.executable, __file__, "--section", "memory-child"]
    cmd += [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k != "section"]
    res = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
    n, d = res["shape"]
    gb = res["nbytes"] / 1e9
    source = f"store entry {args.mem_store} (cls+mean)" if args.mem_store else "in-memory numpy"
    if "hwm" in res:
        print(
            f"memory: LogisticProbe(C={args.mem_c}, max_iter={args.mem_iter}).fit on {n} x {d} "
            f"float16 ({gb:.2f} GB), {source}: {res['seconds']:.0f} s, L-BFGS iterations per label "
            f"{res['iters']} (converged: {sum(res['converged'])}/{len(res['converged'])}); "
            f"peak RSS {res['hwm'] / 1e9:.2f} GB = {res['hwm'] / res['nbytes']:.3f}x the float16 "
            f"size; above the process without features ({res['base'] / 1e9:.2f} GB): "
            f"{(res['hwm'] - res['base']) / res['nbytes']:.3f}x"
        )
    if "read_hwm" in res:
        print(
            f"  reading the entry by ids: {res['read_seconds']:.0f} s, peak RSS "
            f"{res['read_hwm'] / 1e9:.2f} GB = {res['read_hwm'] / res['nbytes']:.3f}x the float16 "
            f"size ({(res['read_hwm'] - res['base']) / res['nbytes']:.3f}x above the process)"
        )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--section", default="all")
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--d", type=int, default=1024)
    ap.add_argument("--n-val", type=int, default=10_000)
    ap.add_argument("--labels", type=int, default=14)
    ap.add_argument("--sk-labels", type=int, default=0, help="labels fitted by scikit-learn")
    ap.add_argument("--sk-cs", type=int, default=5, help="Cs fitted by scikit-learn")
    ap.add_argument("--old-n", type=int, default=0)
    ap.add_argument("--old-d", type=int, default=512)
    ap.add_argument("--old-every", type=int, default=4)
    ap.add_argument("--queries", type=int, default=5_000)
    ap.add_argument("--n-test", type=int, default=20_000)
    ap.add_argument("--mem-n", type=int, default=100_000)
    ap.add_argument("--mem-d", type=int, default=4096)
    ap.add_argument("--mem-c", type=float, default=1e-2)
    ap.add_argument("--mem-iter", type=int, default=1000)
    ap.add_argument("--mem-store", default="", help="directory of a cache root to read from")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    sections = {
        "linear": bench_linear,
        "knn": bench_knn,
        "bootstrap": bench_bootstrap,
        "memory": bench_memory,
        "memory-child": memory_child,
    }
    if args.section == "all":
        for name in ("bootstrap", "knn", "linear", "memory"):
            sections[name](args)
    else:
        sections[args.section](args)


if __name__ == "__main__":
    main()
