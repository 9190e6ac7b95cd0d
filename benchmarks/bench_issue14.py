"""Issue 14's own table: a linear probe on tiny-DINOv3 features of the digits, whole processes.

Features: ``test/tiny-dinov3-vit`` (random weights, 32 dims) ``cls+mean`` (64 dims) of the 1,797
scikit-learn digit images (8 x 8, 0..16 rescaled to [0, 1], grey, squash-resized to 64 px with
embedkit's :class:`~embedkit.data.transforms.Preprocessing`), extracted once and kept in
``--features`` (float32 ``.npz``). Splits as the ladder of ``bench_probes.py``: test 20%,
validation 10% of the rest, seed 0.

Each side runs as its own Python process (imports included), timed by the parent (wall, and
user + system CPU of the child):

- ``embedkit``: ``LogisticProbe().fit_select`` (default tol, 45 Cs, validation choice, refit),
  embedkit's own thread rule;
- ``embedkit tol 1e-12``: the same at DINOv2's strict tol (the reference for ΔAUROC);
- ``sklearn``: ``LogisticRegression(lbfgs, max_iter=1000)`` at its defaults (tol 1e-4),
  standardised, the same 45 Cs, the same choice rule (validation accuracy, smallest best C),
  refit on train + val; one BLAS thread (``OMP_NUM_THREADS=1``), no torch imported.

``--load quiet`` runs as is (and prints the load average; quiet means < 1.5); ``--load busy``
first starts two CPU-bound processes (``while True: pass``), and stops them at the end.

    python benchmarks/bench_issue14.py --load quiet
    python benchmarks/bench_issue14.py --load busy
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve()
DEFAULT_FEATURES = Path("/tmp/embedkit-bench/digits-tiny-dinov3-64px.npz")
CS = np.logspace(-6, 5, 45)


def extract_features(path: Path) -> None:
    """``cls+mean`` of the digits through ``test/tiny-dinov3-vit`` at 64 px, saved to ``path``."""
    import torch
    from sklearn.datasets import load_digits

    from embedkit.data.transforms import Preprocessing
    from embedkit.models.loading import load_encoder

    images, y = load_digits(return_X_y=True)
    encoder = load_encoder("test/tiny-dinov3-vit", cache_dir=path.parent / "model-cache")
    prep = Preprocessing(64, mean=encoder.spec.mean, std=encoder.spec.std)
    pixels = torch.stack([prep(img.reshape(8, 8) / 16.0) for img in images])
    feats = [encoder.encode(pixels[i : i + 256], ["cls+mean"])["cls+mean"]
             for i in range(0, len(pixels), 256)]  # fmt: skip
    X = torch.cat(feats).numpy().astype(np.float32)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, X=X, y=y)
    print(f"extracted {X.shape} features to {path}", flush=True)


def splits(path: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    data = np.load(path)
    X, y = data["X"], data["y"]
    perm = np.random.default_rng(0).permutation(X.shape[0])
    n_te = X.shape[0] // 5
    n_va = (X.shape[0] - n_te) // 10
    parts = {"test": perm[:n_te], "val": perm[n_te : n_te + n_va], "train": perm[n_te + n_va :]}
    return {k: (X[np.sort(i)], y[np.sort(i)]) for k, i in parts.items()}


def child_embedkit(path: Path, tol: float | None) -> dict[str, Any]:
    from embedkit.probes import LogisticProbe

    s = splits(path)
    probe = LogisticProbe(**({} if tol is None else {"tol": tol}))
    probe.fit_select(*s["train"], None, *s["val"], None)
    return {"C": float(probe.C_), "proba": probe.predict_proba(s["test"][0]).tolist()}


def child_sklearn(path: Path) -> dict[str, Any]:
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    s = splits(path)
    (Xtr, ytr), (Xva, yva) = s["train"], s["val"]
    sc = StandardScaler().fit(Xtr.astype(np.float64))
    Xs, Xvs = sc.transform(Xtr.astype(np.float64)), sc.transform(Xva.astype(np.float64))
    accs = [
        (LogisticRegression(C=C, max_iter=1000).fit(Xs, ytr).predict(Xvs) == yva).mean() for C in CS
    ]
    C = float(CS[int(np.argmax(accs))])
    Xall = np.vstack([Xtr, Xva]).astype(np.float64)
    sc = StandardScaler().fit(Xall)
    clf = LogisticRegression(C=C, max_iter=1000).fit(sc.transform(Xall), np.concatenate([ytr, yva]))
    proba = clf.predict_proba(sc.transform(s["test"][0].astype(np.float64)))
    return {"C": C, "proba": proba.tolist()}


def run_child(side: str, path: Path) -> dict[str, Any]:
    env = dict(os.environ)
    if side == "sklearn":
        env.update(OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    out = subprocess.run(
        [sys.executable, str(HERE), "--child", side, "--features", str(path)],
        env=env, capture_output=True, text=True, check=True,
    )  # fmt: skip
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    result.update(wall=wall, cpu=cpu)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--features", type=Path, default=DEFAULT_FEATURES)
    ap.add_argument("--load", choices=["quiet", "busy"], default="quiet")
    ap.add_argument("--repeat", type=int, default=3, help="runs per side; the median is shown")
    ap.add_argument("--child", choices=["embedkit", "embedkit-strict", "sklearn"])
    args = ap.parse_args()
    if args.child:
        res = {
            "embedkit": lambda: child_embedkit(args.features, None),
            "embedkit-strict": lambda: child_embedkit(args.features, 1e-12),
            "sklearn": lambda: child_sklearn(args.features),
        }[args.child]()
        print(json.dumps(res))
        return
    if not args.features.exists():
        extract_features(args.features)
    from embedkit.eval.metrics import ovr_macro_auroc

    y_test = splits(args.features)["test"][1]
    hogs: list[subprocess.Popen[bytes]] = []
    try:
        if args.load == "busy":
            hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)]
            time.sleep(2.0)
        print(f"load average before: {os.getloadavg()[0]:.2f} ({args.load}; "
              f"{len(hogs)} CPU-bound processes started)", flush=True)  # fmt: skip
        rows: dict[str, list[dict[str, Any]]] = {}
        for _ in range(args.repeat):  # interleaved, so drifting load hits every side alike
            for side in ("embedkit", "sklearn", "embedkit-strict"):
                rows.setdefault(side, []).append(run_child(side, args.features))
        print(f"load average after: {os.getloadavg()[0]:.2f}", flush=True)
    finally:
        for h in hogs:
            h.kill()
            h.wait()
    ref = ovr_macro_auroc(y_test, np.array(rows["embedkit-strict"][0]["proba"]), None)
    med: dict[str, dict[str, float]] = {}
    for side, runs in rows.items():
        auroc = ovr_macro_auroc(y_test, np.array(runs[0]["proba"]), None)
        med[side] = {"wall": float(np.median([r["wall"] for r in runs])),
                     "cpu": float(np.median([r["cpu"] for r in runs]))}  # fmt: skip
        walls = ", ".join(f"{r['wall']:.2f}" for r in runs)
        print(f"  {side:16s} wall {med[side]['wall']:6.2f} s  CPU {med[side]['cpu']:6.2f} s  "
              f"(runs: {walls})  C {runs[0]['C']:.4g}  "
              f"test AUROC {auroc:.6f}  dAUROC vs tol 1e-12 {auroc - ref:+.1e}")  # fmt: skip
    e, s = med["embedkit"], med["sklearn"]
    print(f"  ratio sklearn / embedkit: wall {s['wall'] / e['wall']:.2f}x, "
          f"CPU {s['cpu'] / e['cpu']:.2f}x")  # fmt: skip


if __name__ == "__main__":
    main()
