"""Probe benchmarks on embedding-like synthetic features (issue 5 "Done when").

Features: decaying spectrum (singular values ~ i^-0.8 after a random rotation), non-zero mean,
stored float16, 14 labels from a sparse logistic model, 5% of entries masked. Sections:

- ``linear``: ``LogisticProbe().fit_path`` (the default configuration: float64, preconditioned
  L-BFGS, 45 Cs = 10 ** linspace(-6, 5, 45), tol 1e-12, max_iter 1000) on ``--n`` x ``--d``
  training rows and ``--n-val`` validation rows. With ``--sk-labels > 0``, scikit-learn one-vs-rest
  ``LogisticRegression(C, max_iter=1000, tol=1e-12)`` (lbfgs, standardised features, cold start)
  is timed on the first ``--sk-labels`` labels at ``--sk-cs`` Cs spread evenly over the grid,
  extrapolated to 14 labels x 45 Cs, and its validation AUROCs are compared with the probe's.
  With ``--old-n > 0`` the previous solver (``precondition=False``) and the default are timed on a
  smaller ``--old-n`` x ``--old-d`` problem over every ``--old-every``-th C, in the same run.
- ``knn``: ``KNNProbe.kneighbors`` (k=20) vs faiss-cpu ``IndexFlatIP`` on L2-normalised float32
  copies (normalisation included in faiss' time), same neighbours checked.
- ``bootstrap``: ``bootstrap_ci`` macro AUROC, 1,000 resamples x 14 labels on ``--n-test`` rows.
- ``memory``: peak resident memory (VmHWM) of ``LogisticProbe(C=...)`` fitted on an
  ``--mem-n`` x ``--mem-d`` float16 matrix, in a fresh subprocess.

    python benchmarks/bench_probes.py --section linear --n 20000 --sk-labels 2
    python benchmarks/bench_probes.py --section knn --n 100000 --queries 5000
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from typing import Any

import numpy as np
import torch

from embedkit.eval.metrics import per_label_auroc
from embedkit.probes import DINOV2_CS, KNNProbe, LogisticProbe


def make_features(
    n: int, d: int, labels: int, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Embedding-like float16 features (built by row chunks: no (n, d) float64 temporary)."""
    rng = np.random.default_rng(seed)
    basis = np.linalg.qr(rng.normal(size=(d, d)))[0]
    spectrum = np.arange(1, d + 1) ** -0.8
    offset = rng.normal(size=d) * 0.5
    W = rng.normal(size=(d, labels)) * (rng.random((d, labels)) < 0.05)
    X = np.empty((n, d), dtype=np.float16)
    y = np.empty((n, labels), dtype=np.float32)
    for lo in range(0, n, 16384):
        hi = min(n, lo + 16384)
        z = (rng.normal(size=(hi - lo, d)) * spectrum) @ basis.T
        X[lo:hi] = z * 3.0 + offset
        logits = z @ W * 4.0 - 1.5
        y[lo:hi] = rng.random((hi - lo, labels)) < 1 / (1 + np.exp(-logits))
    mask = rng.random((n, labels)) > 0.05
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
        print(
            f"  sklearn OvR lbfgs measured {sk_time:.1f} s on {args.sk_labels} labels x "
            f"{pick.size} Cs ({n_max_iter} fits hit max_iter), extrapolated x{factor:.1f} to "
            f"{args.labels} labels x {Cs.size} Cs: {sk_est:.0f} s; ratio sklearn / probe "
            f"{sk_est / t_probe:.1f}x; max |dAUROC| {max_delta:.2e}"
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
    knn = KNNProbe(k=20).fit(Xtr, y[: args.n], mask[: args.n])
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


def memory_child(args: argparse.Namespace) -> None:
    """Runs in a fresh process: VmHWM after building X, and after fitting."""
    torch.set_num_threads(args.threads)
    X, y, mask = make_features(args.mem_n, args.mem_d, args.labels)
    import gc

    gc.collect()
    base = _vm("VmRSS") - X.nbytes  # process without the features (torch, numpy, labels)
    with open("/proc/self/clear_refs", "w") as fh:  # reset VmHWM: data generation is not measured
        fh.write("5")
    t0 = time.perf_counter()
    probe = LogisticProbe(C=args.mem_c, max_iter=args.mem_iter).fit(X, y, mask)
    out: dict[str, Any] = {
        "nbytes": X.nbytes,
        "base": base,
        "hwm": _vm("VmHWM"),
        "seconds": time.perf_counter() - t0,
        "iters": probe.n_iter_.tolist(),
    }
    print(json.dumps(out))


def bench_memory(args: argparse.Namespace) -> None:
    cmd = [sys.executable, __file__, "--section", "memory-child"]
    cmd += [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k != "section"]
    res = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
    gb = res["nbytes"] / 1e9
    print(
        f"memory: LogisticProbe(C={args.mem_c}, max_iter={args.mem_iter}) on {args.mem_n} x "
        f"{args.mem_d} float16 ({gb:.2f} GB): {res['seconds']:.0f} s; peak RSS "
        f"{res['hwm'] / 1e9:.2f} GB = {res['hwm'] / res['nbytes']:.2f}x the float16 size; "
        f"above the process without features ({res['base'] / 1e9:.2f} GB): "
        f"{(res['hwm'] - res['base']) / res['nbytes']:.2f}x"
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
