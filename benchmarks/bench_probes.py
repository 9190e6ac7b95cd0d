"""Probe speed vs scikit-learn on embedding-like synthetic features.

Features: decaying spectrum (singular values ~ i^-0.8), non-zero mean, 14 labels from a sparse
logistic model. Times (a) LogisticProbe's batched torch L-BFGS over a warm-started path of C values
vs scikit-learn one-vs-rest LogisticRegression(lbfgs) cold fits on a subset of the Cs (timed per
C and extrapolated to the whole path; both on standardised features), and (b) KNNProbe vs
scikit-learn brute-force cosine neighbours. Prints ratios and the max |Δ AUROC| between the two.

    python benchmarks/bench_probes.py --n 10000 --d 384   # ~2-3 min on 2 cores
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.neighbors import KNeighborsClassifier
from sklearn.preprocessing import StandardScaler

from embedkit.eval.metrics import per_label_auroc
from embedkit.probes import KNNProbe, LogisticProbe


def make_features(
    n: int, d: int, labels: int, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    basis = np.linalg.qr(rng.normal(size=(d, d)))[0]
    latent = rng.normal(size=(n, d)) * (np.arange(1, d + 1) ** -0.8)
    X = (latent @ basis.T * 3.0 + rng.normal(size=d) * 0.5).astype(np.float16)
    W = rng.normal(size=(d, labels)) * (rng.random((d, labels)) < 0.05)
    logits = latent @ basis.T @ W * 4.0 - 1.5
    y = (rng.random((n, labels)) < 1 / (1 + np.exp(-logits))).astype(np.float32)
    mask = rng.random((n, labels)) > 0.05
    return X, y, mask


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=20_000)
    ap.add_argument("--d", type=int, default=768)
    ap.add_argument("--labels", type=int, default=14)
    ap.add_argument("--n-cs", type=int, default=8)
    ap.add_argument("--sk-cs", type=int, default=2, help="Cs fitted by scikit-learn")
    ap.add_argument("--queries", type=int, default=5_000)
    args = ap.parse_args()
    torch.set_num_threads(2)
    X, y, mask = make_features(args.n + args.queries, args.d, args.labels)
    Xtr, ytr, mtr = X[: args.n], y[: args.n], mask[: args.n]
    Xte, yte, mte = X[args.n :], y[args.n :], mask[args.n :]
    Cs = np.logspace(-4, 1, args.n_cs)
    print(f"features {args.n} x {args.d} float16, {args.labels} labels, {args.n_cs} Cs")

    results: dict[str, float] = {}
    scores_by_dtype: dict[str, np.ndarray] = {}
    for name, dtype in (("float64", torch.float64), ("float32", torch.float32)):
        probe = LogisticProbe(Cs=Cs, dtype=dtype)
        t0 = time.perf_counter()
        path = probe.fit_path(Xtr, ytr, mtr, Xte, yte, mte)
        results[name] = time.perf_counter() - t0
        print(f"torch path {name}: {results[name]:.1f} s, iters per C {path.n_iter.mean(1)}")
        scores_by_dtype[name] = path.scores

    scaler = StandardScaler().fit(Xtr.astype(np.float64))
    Xs, Xts = scaler.transform(Xtr.astype(np.float64)), scaler.transform(Xte.astype(np.float64))
    # scikit-learn is timed on the first sk_cs Cs of the path after the strongest (weak C takes
    # minutes), then extrapolated: an optimistic estimate for scikit-learn on the whole path.
    pick = np.arange(1, 1 + args.sk_cs)
    sk_time, max_delta = 0.0, 0.0
    for i in pick:
        t0 = time.perf_counter()
        proba = np.empty(yte.shape)
        for j in range(args.labels):
            rows = mtr[:, j]
            clf = LogisticRegression(C=Cs[i], max_iter=1000, tol=1e-12).fit(Xs[rows], ytr[rows, j])
            proba[:, j] = clf.predict_proba(Xts)[:, 1]
        sk_time += time.perf_counter() - t0
        sk_auc = per_label_auroc(yte, mte, proba)
        delta = np.abs(sk_auc - scores_by_dtype["float64"][i]).max()
        d32 = np.abs(sk_auc - scores_by_dtype["float32"][i]).max()
        max_delta = max(max_delta, delta)
        print(
            f"sklearn C={Cs[i]:.3g}: {time.perf_counter() - t0:.1f} s, max |dAUROC| vs torch "
            f"float64 {delta:.2e}, float32 {d32:.2e}"
        )
    sk_path = sk_time / pick.size * args.n_cs
    print(
        f"sklearn OvR lbfgs, extrapolated to {args.n_cs} Cs: {sk_path:.1f} s; ratio sklearn/torch "
        f"float64 {sk_path / results['float64']:.1f}x, float32 {sk_path / results['float32']:.1f}x"
    )
    print(f"max |dAUROC| torch float64 vs sklearn over fitted Cs: {max_delta:.2e}")

    # kNN, k = 20, queries x train
    knn = KNNProbe(k=20).fit(Xtr, ytr, mtr)
    t0 = time.perf_counter()
    _, idx = knn.kneighbors(Xte, 20)
    t_knn = time.perf_counter() - t0
    Xtr32, Xte32 = Xtr.astype(np.float32), Xte.astype(np.float32)
    t0 = time.perf_counter()
    ref = KNeighborsClassifier(20, metric="cosine", algorithm="brute").fit(Xtr32, ytr[:, 0])
    _, ref_idx = ref.kneighbors(Xte32)
    t_sk = time.perf_counter() - t0
    same = np.mean([len(set(a) & set(b)) / 20 for a, b in zip(idx, ref_idx, strict=True)])
    print(
        f"kNN k=20 {args.queries} x {args.n}: embedkit {t_knn:.1f} s, sklearn brute {t_sk:.1f} s, "
        f"ratio {t_sk / t_knn:.1f}x, neighbour overlap {same:.4f}"
    )


if __name__ == "__main__":
    main()
