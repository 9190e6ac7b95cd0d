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
- ``ladder`` (issue 14): the size ladder, ``--rows digits,chexpert,large``: digits-like
  multi-class (scikit-learn digits, 1,797 x 64, 10 classes), CheXpert-like multi-label (20,000 x
  768, 14 labels, masks) and large (100,000 x 1,536); ``--scale`` shrinks the synthetic rows
  (labelled). Per row, in one run on identical data and splits (test 20%, validation 10% of the
  rest): ``LogisticProbe`` at its default tol and at tol 1e-12, and scikit-learn
  ``LogisticRegression`` (lbfgs, max_iter 1000, standardised, one-vs-rest on valid rows) at its
  default tol 1e-4 and at 1e-12 through the same protocol (45 Cs, validation choice, refit);
  wall and CPU seconds, chosen C, test AUROC and its difference to embedkit's tol-1e-12 model.
  ``--ladder-sk-cs`` / ``--ladder-sk-labels`` below 45 / 14 fit scikit-learn on that subset and
  extrapolate its time (labelled so, no AUROC then).
- ``small``: kNN (k=20, DINO vote) vs scikit-learn ``KNeighborsClassifier`` (brute, cosine, the
  same weights) and faiss when installed, and few-shot (linear, C=1, 1-16 shots x 5 seeds) vs a
  plain scikit-learn loop over the same draws, on the ladder rows.
- ``knn``: ``KNNProbe.kneighbors`` (k=20) vs faiss-cpu ``IndexFlatIP`` on L2-normalised float32
  copies (normalisation included in faiss' time), same neighbours checked.
- ``bootstrap``: ``bootstrap_ci`` macro AUROC, 1,000 resamples x 14 labels on ``--n-test`` rows.
- ``memory``: peak resident memory (VmHWM) of ``LogisticProbe(C=...)`` fitted on an
  ``--mem-n`` x ``--mem-d`` float16 matrix, in a fresh subprocess; with ``--mem-store DIR`` the
  matrix is a complete cache entry ("cls" + "mean", written there on first use) read by ids as
  the probe runner reads it, and the peak of that read is reported too.

    python benchmarks/bench_probes.py --section ladder --threads 1
    python benchmarks/bench_probes.py --section ladder --rows large --ladder-sk-cs 5 \
        --ladder-sk-labels 1
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
import warnings
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


# ---- the size ladder (issue 14): embedkit vs scikit-learn at its defaults and at the protocol tol
LADDER_ROWS = {
    "digits": "digits-like multi-class: scikit-learn digits, 1,797 x 64, 10 classes",
    "chexpert": "CheXpert-like multi-label: 20,000 x 768 float16, 14 labels, 5% masked",
    "large": "large multi-label: 100,000 x 1,536 float16, 14 labels, 5% masked",
}


def ladder_data(row: str, scale: float) -> dict[str, Any]:
    """Train / val / test of one ladder row: test = 20% of the rows, val = 10% of the rest
    (DINOv2's split, seed 0). ``scale`` shrinks the synthetic rows' row count."""
    rng = np.random.default_rng(0)
    if row == "digits":
        from sklearn.datasets import load_digits

        X, y = load_digits(return_X_y=True)
        X, M = X.astype(np.float32), None
    else:
        n, d = {"chexpert": (20_000, 768), "large": (100_000, 1536)}[row]
        X, y, M = make_features(int(n * scale), d, 14)
    perm = rng.permutation(X.shape[0])
    n_te = X.shape[0] // 5
    n_va = (X.shape[0] - n_te) // 10
    parts = {"test": perm[:n_te], "val": perm[n_te : n_te + n_va], "train": perm[n_te + n_va :]}
    out: dict[str, Any] = {"multiclass": M is None}
    for name, idx in parts.items():
        idx = np.sort(idx)
        out[name] = (X[idx], y[idx], None if M is None else M[idx])
    return out


def _test_auroc(data: dict[str, Any], proba: np.ndarray) -> float:
    from embedkit.eval.metrics import ovr_macro_auroc

    _, yt, mt = data["test"]
    if data["multiclass"]:
        return float(ovr_macro_auroc(yt, proba, None))
    return float(np.nanmean(per_label_auroc(yt, mt, proba)))


def ladder_embedkit(data: dict[str, Any], tol: float | None) -> dict[str, Any]:
    kw = {} if tol is None else {"tol": tol}
    t0, c0 = time.perf_counter(), time.process_time()
    probe = LogisticProbe(**kw).fit_select(*data["train"], *data["val"])
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    proba = probe.predict_proba(data["test"][0])
    return {"wall": wall, "cpu": cpu, "C": float(probe.C_), "auroc": _test_auroc(data, proba)}


def ladder_sklearn(data: dict[str, Any], tol: float, n_cs: int, n_labels: int) -> dict[str, Any]:
    """scikit-learn ``LogisticRegression(lbfgs, C, tol, max_iter=1000)`` (one-vs-rest on each
    label's valid rows for multi-label, multinomial for multi-class), standardised features,
    through the same protocol: validation metric per C (accuracy / macro AUROC), the smallest
    best C, refit on train + val. With ``n_cs`` < 45 or ``n_labels`` < 14 only that subset is
    fitted and the time is extrapolated (labelled), and the chosen C / AUROC are not reported."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    from embedkit.eval.metrics import accuracy

    (Xtr, ytr, mtr), (Xva, yva, mva) = data["train"], data["val"]
    sc = StandardScaler().fit(Xtr.astype(np.float64))
    Xs, Xvs = sc.transform(Xtr.astype(np.float64)), sc.transform(Xva.astype(np.float64))
    cs = DINOV2_CS
    pick = np.linspace(0, cs.size - 1, n_cs).round().astype(int)
    labels = 1 if data["multiclass"] else min(n_labels, ytr.shape[1])

    def fit(X: np.ndarray, y: np.ndarray, m: np.ndarray | None, C: float, Xp: np.ndarray):
        clf = LogisticRegression(C=C, tol=tol, max_iter=1000)
        if data["multiclass"]:
            return clf.fit(X, y).predict_proba(Xp)
        cols = [clf.fit(X[m[:, j]], y[m[:, j], j]).predict_proba(Xp)[:, 1] for j in range(labels)]
        return np.stack(cols, axis=1)

    warnings.filterwarnings("ignore", category=ConvergenceWarning)  # expected at tol 1e-12
    t0, c0 = time.perf_counter(), time.process_time()
    scores = []
    for i in pick:
        p = fit(Xs, ytr, mtr, cs[i], Xvs)
        if data["multiclass"]:
            scores.append(accuracy(yva, p, None))
        else:
            scores.append(np.nanmean(per_label_auroc(yva[:, :labels], mva[:, :labels], p)))
    C = float(cs[pick[int(np.nanargmax(scores))]])
    Xall = np.vstack([Xtr, Xva]).astype(np.float64)
    yall = np.concatenate([ytr, yva])
    mall = None if mtr is None else np.vstack([mtr, mva])
    sc = StandardScaler().fit(Xall)
    proba = fit(sc.transform(Xall), yall, mall, C, sc.transform(data["test"][0].astype(np.float64)))
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    factor = (cs.size + 1) / (pick.size + 1) * (14 / labels if not data["multiclass"] else 1)
    out = {"wall": wall * factor, "cpu": cpu * factor, "extrapolated": factor > 1}
    if factor == 1:
        out.update(C=C, auroc=_test_auroc(data, proba))
    else:
        out["measured"] = f"{labels} label(s) x {pick.size} Cs in {wall:.0f} s, x{factor:.1f}"
    return out


def bench_ladder(args: argparse.Namespace) -> None:
    from threadpoolctl import threadpool_limits

    for row in args.rows.split(","):
        data = ladder_data(row, args.scale)
        n_tr = data["train"][0].shape[0]
        print(f"ladder {row}: {LADDER_ROWS[row]} (train {n_tr}, scale {args.scale}), "
              f"{args.threads} thread(s)", flush=True)  # fmt: skip
        with threadpool_limits(args.threads):
            strict = ladder_embedkit(data, 1e-12)
            default = ladder_embedkit(data, None)
            res = {
                "embedkit default": default,
                "embedkit tol 1e-12": strict,
                "sklearn default (tol 1e-4)": ladder_sklearn(
                    data, 1e-4, args.ladder_sk_cs, args.ladder_sk_labels
                ),
                "sklearn tol 1e-12": ladder_sklearn(
                    data, 1e-12, args.ladder_sk_cs, args.ladder_sk_labels
                ),
            }
        for name, r in res.items():
            extra = f", extrapolated from {r['measured']}" if r.get("extrapolated") else (
                f", C {r['C']:.4g}, test AUROC {r['auroc']:.6f}, dAUROC vs embedkit tol 1e-12 "
                f"{r['auroc'] - strict['auroc']:+.1e}"
            )  # fmt: skip
            print(f"  {name:28s} wall {r['wall']:8.1f} s  CPU {r['cpu']:8.1f} s{extra}")
        sk_d, sk_s = res["sklearn default (tol 1e-4)"], res["sklearn tol 1e-12"]
        print(
            f"  ratio wall sklearn-default / embedkit {sk_d['wall'] / default['wall']:.1f}x "
            f"(CPU {sk_d['cpu'] / default['cpu']:.1f}x); sklearn-tol-1e-12 / embedkit "
            f"{sk_s['wall'] / default['wall']:.1f}x (CPU {sk_s['cpu'] / default['cpu']:.1f}x); "
            f"embedkit tol 1e-12 / default {strict['wall'] / default['wall']:.1f}x",
            flush=True,
        )


def bench_small(args: argparse.Namespace) -> None:
    """kNN and few-shot on the ladder's small rows against scikit-learn (and faiss if present)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.preprocessing import StandardScaler
    from threadpoolctl import threadpool_limits

    from embedkit.probes import run_fewshot, sample_fewshot

    for row in args.rows.split(","):
        data = ladder_data(row, args.scale)
        (Xtr, ytr, mtr), (Xte, yte, _) = data["train"], data["test"]
        if not data["multiclass"]:  # scikit-learn's kNN has no masks: fully labelled here
            mtr = np.ones_like(mtr)
        print(f"small {row}: {LADDER_ROWS[row]} (train {Xtr.shape[0]}, test {Xte.shape[0]})")
        with threadpool_limits(args.threads):
            t0, c0 = time.perf_counter(), time.process_time()
            ours = KNNProbe(k=20).fit(Xtr, ytr, mask=mtr).predict_proba(Xte)
            w_e, c_e = time.perf_counter() - t0, time.process_time() - c0

            def weights(dist: np.ndarray) -> np.ndarray:  # DINO's vote: exp(cos / 0.07)
                return np.exp((1.0 - dist) / 0.07 - 1.0 / 0.07)

            t0, c0 = time.perf_counter(), time.process_time()
            sk = KNeighborsClassifier(20, weights=weights, algorithm="brute", metric="cosine")
            p = sk.fit(Xtr.astype(np.float32), ytr).predict_proba(Xte.astype(np.float32))
            w_s, c_s = time.perf_counter() - t0, time.process_time() - c0
            p = np.asarray(p) if data["multiclass"] else np.stack([q[:, 1] for q in p], axis=1)
            print(
                f"  knn k=20: KNNProbe {w_e:.2f} s (CPU {c_e:.2f}), sklearn KNeighborsClassifier "
                f"(brute, cosine, DINO weights) {w_s:.2f} s (CPU {c_s:.2f}); ratio sklearn / "
                f"embedkit {w_s / w_e:.1f}x; max |d score| {np.abs(ours - p).max():.1e}"
            )
            try:
                import faiss
            except ImportError:
                print("  knn faiss: not installed here (pip install faiss-cpu), skipped")
            else:
                t0 = time.perf_counter()
                a = Xtr.astype(np.float32)
                a /= np.linalg.norm(a, axis=1, keepdims=True)
                q = Xte.astype(np.float32)
                q /= np.linalg.norm(q, axis=1, keepdims=True)
                index = faiss.IndexFlatIP(a.shape[1])
                index.add(a)
                index.search(q, 20)
                print(f"  knn faiss IndexFlatIP search only: {time.perf_counter() - t0:.2f} s")
            if not data["multiclass"]:
                continue
            groups = np.arange(Xtr.shape[0])
            shots, seeds = (1, 2, 4, 8, 16), range(5)
            t0, c0 = time.perf_counter(), time.process_time()
            res = run_fewshot(Xtr, ytr, None, groups, Xte, yte, None, shots=shots, seeds=seeds)
            w_e, c_e = time.perf_counter() - t0, time.process_time() - c0
            t0, c0 = time.perf_counter(), time.process_time()
            from embedkit.eval.metrics import ovr_macro_auroc

            aucs = []
            for n_shots in shots:
                for seed in seeds:
                    d = sample_fewshot(ytr, None, groups, n_shots, seed)
                    sc = StandardScaler().fit(Xtr[d.indices].astype(np.float64))
                    clf = LogisticRegression(C=1.0).fit(
                        sc.transform(Xtr[d.indices]), ytr[d.indices]
                    )
                    aucs.append(ovr_macro_auroc(yte, clf.predict_proba(sc.transform(Xte)), None))
            w_s, c_s = time.perf_counter() - t0, time.process_time() - c0
            ours_auc = [res.runs[(n, s)]["ovr_macro_auroc"] for n in shots for s in seeds]
            print(
                f"  few-shot linear C=1, shots {list(shots)} x 5 seeds: run_fewshot {w_e:.2f} s "
                f"(CPU {c_e:.2f}), scikit-learn loop (same draws) {w_s:.2f} s (CPU {c_s:.2f}); "
                f"ratio {w_s / w_e:.1f}x; max |d AUROC| "
                f"{np.nanmax(np.abs(np.array(ours_auc) - np.array(aucs))):.2e}"
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
    ap.add_argument("--rows", default="digits,chexpert,large", help="ladder rows")
    ap.add_argument("--ladder-sk-cs", type=int, default=45, help="ladder: sklearn Cs fitted")
    ap.add_argument(
        "--ladder-sk-labels", type=int, default=14, help="ladder: sklearn tol 1e-12 labels"
    )
    ap.add_argument("--scale", type=float, default=1.0, help="ladder: synthetic rows x scale")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    sections = {
        "linear": bench_linear,
        "ladder": bench_ladder,
        "small": bench_small,
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
