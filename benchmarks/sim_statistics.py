"""Simulation check of embedkit's bootstrap CIs and paired tests (docs/statistics.md).

Two questions, answered on synthetic test sets whose true AUROCs are known:

1. **Coverage** of the 95% percentile CI of the macro AUROC on small test sets with a rare label,
   with the resamples of ``bootstrap_indices(..., targets=y)`` (every replicate keeps the label
   set of the point estimate: embedkit's rule) and with plain resamples (replicates that miss the
   rare label average over fewer labels). Test sets are drawn conditional on every label having
   both classes, so the point estimate always measures the macro over all labels, whose true
   value is ``mean_j Φ(d_j / √2)`` for scores ``d_j y + N(0, 1)``.
2. **Null rejection rate** at α = 0.05 of the paired comparison of two equally good models
   (same ``d_j``, noise correlated ρ = 0.5 between the models): the paired permutation test that
   embedkit's report uses, the paired bootstrap p-value (percentile form, as
   ``paired_bootstrap_test`` returns it), the centred ("shift") bootstrap p-value, and DeLong's
   test on the first (common) label for reference.

3. **Coverage by positives**: the 95% CI of one label's AUROC with exactly k positives among 150
   test images, which sets the rare-label flag of the records (fewer than 10).

Run: ``python benchmarks/sim_statistics.py --sims 1000`` (~12 minutes on 2 cores; ``--part
positives`` or ``--part designs`` runs one half). The figures in docs/statistics.md come from
it; the seed makes a run repeatable.
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from embedkit.eval import bootstrap as B
from embedkit.eval import delong_test
from embedkit.eval.permutation import paired_permutation_test


@dataclass(frozen=True)
class Design:
    n: int
    prevalence: tuple[float, ...]
    effect: tuple[float, ...]  # d_j: score = d_j * y + N(0, 1)

    @property
    def true_macro(self) -> float:
        return float(np.mean([0.5 * (1 + math.erf(d / 2)) for d in self.effect]))  # Φ(d/√2)


def _test_set(rng: np.random.Generator, design: Design) -> NDArray[np.float64]:
    """Targets (n, L) with both classes in every label (redrawn until so)."""
    while True:
        y = (rng.random((design.n, len(design.prevalence))) < design.prevalence).astype(float)
        if (y.sum(0) > 0).all() and (y.sum(0) < design.n).all():
            return y


def _scores(
    rng: np.random.Generator, y: NDArray[np.float64], design: Design, common: NDArray[np.float64]
) -> NDArray[np.float64]:
    noise = math.sqrt(0.5) * common + math.sqrt(0.5) * rng.normal(size=y.shape)
    return np.asarray(y * np.asarray(design.effect) + noise)


def simulate(design: Design, sims: int, n_boot: int, seed: int) -> dict[str, float]:
    rng = np.random.default_rng(seed)
    covered = {"fixed label set": 0, "plain resamples": 0}
    rejected = {
        "paired permutation (report)": 0,
        "paired bootstrap (percentile p)": 0,
        "paired bootstrap (centred p)": 0,
    }
    delong_rejected = 0
    for sim in range(sims):
        y = _test_set(rng, design)
        common = rng.normal(size=y.shape)
        sa = _scores(rng, y, design, common)
        sb = _scores(rng, y, design, common)
        fixed = B.bootstrap_indices(design.n, n_boot, seed=sim, targets=y)
        plain = B.bootstrap_indices(design.n, n_boot, seed=sim)
        truth = design.true_macro
        for name, idx in (("fixed label set", fixed), ("plain resamples", plain)):
            ci = B.bootstrap_ci(y, None, sa, "macro_auroc", idx)
            covered[name] += ci.low <= truth <= ci.high
        perm = paired_permutation_test(y, None, sa, sb, n_perm=n_boot, seed=sim)
        rejected["paired permutation (report)"] += perm.p_value < 0.05
        test = B.paired_bootstrap_test(y, None, sa, sb, fixed)
        rejected["paired bootstrap (percentile p)"] += test.p_value < 0.05
        diffs = B._replicates(y, None, sa, "macro_auroc", fixed) - B._replicates(
            y, None, sb, "macro_auroc", fixed
        )
        centred = (1 + np.sum(np.abs(diffs - test.delta) >= abs(test.delta))) / (diffs.size + 1)
        rejected["paired bootstrap (centred p)"] += centred < 0.05
        delong_rejected += delong_test(y[:, 0], sa[:, 0], sb[:, 0]).p_value < 0.05
    out = {f"coverage, {k}": v / sims for k, v in covered.items()}
    out.update({f"null rejection, {k}": v / sims for k, v in rejected.items()})
    out["null rejection, DeLong (first label)"] = delong_rejected / sims
    return out


def coverage_by_positives(
    n: int, positives: tuple[int, ...], sims: int, n_boot: int, seed: int, effect: float = 1.0
) -> dict[int, float]:
    """Coverage of the 95% bootstrap CI (fixed label set) of one label's AUROC with exactly
    ``k`` positives among ``n`` test images (scores ``effect * y + N(0, 1)``): how few positives
    a label may have before its CI stops meaning 95% (the rare-label flag of the records)."""
    truth = 0.5 * (1 + math.erf(effect / 2))
    out = {}
    for k in positives:
        rng = np.random.default_rng(seed + k)
        hits = 0
        for sim in range(sims):
            y = np.zeros((n, 1))
            y[rng.choice(n, k, replace=False)] = 1.0
            s = y * effect + rng.normal(size=y.shape)
            idx = B.bootstrap_indices(n, n_boot, seed=sim, targets=y)
            ci = B.bootstrap_ci(y, None, s, "auroc", idx)
            hits += ci.low <= truth <= ci.high
        out[k] = hits / sims
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sims", type=int, default=1000)
    parser.add_argument("--n-boot", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--part", choices=("all", "designs", "positives"), default="all",
        help="designs: coverage and null rejection; positives: coverage by positives per label",
    )  # fmt: skip
    args = parser.parse_args()
    designs = {
        "n=150, prevalences 0.3/0.2/0.1/0.015": Design(
            150, (0.3, 0.2, 0.1, 0.015), (1.0, 0.8, 0.6, 0.5)
        ),
        "n=400, prevalences 0.3/0.2/0.1/0.01": Design(
            400, (0.3, 0.2, 0.1, 0.01), (1.0, 0.8, 0.6, 0.5)
        ),
    }
    se = math.sqrt(0.05 * 0.95 / args.sims)
    print(f"{args.sims} simulations per design, {args.n_boot} resamples; ±{se:.3f} is one")
    print("simulation standard error of a 5% rate (coverage target 0.95, rejection 0.05)")
    if args.part in ("all", "positives"):
        started = time.perf_counter()
        ks = (2, 3, 5, 10, 20, 40)
        result = coverage_by_positives(150, ks, args.sims, args.n_boot, args.seed)
        print("\none label, n=150, AUROC 0.760, 95% CI coverage by positives in test:")
        for k, value in result.items():
            print(f"  {k:>3} positives  {value:.3f}")
        print(f"  ({time.perf_counter() - started:.0f} s)")
    if args.part == "positives":
        return
    for label, design in designs.items():
        started = time.perf_counter()
        result = simulate(design, args.sims, args.n_boot, args.seed)
        print(f"\n{label} (true macro AUROC {design.true_macro:.4f}):")
        for name, value in result.items():
            print(f"  {name:<45} {value:.3f}")
        print(f"  ({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
