"""Reports from result records alone: tables, paired comparisons, plots, one offline HTML page."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from embedkit.errors import CacheNotFoundError
from embedkit.report import build_report
from embedkit.results import ResultRecord, ResultsDir, ScoreTable

LABELS = ("A", "B", "C")


def _write(results: ResultsDir, model: str, res: int, kind: str, noise: float) -> np.ndarray:
    rng = np.random.default_rng(7)  # the same test set (ids, targets) for every run
    n = 120
    y = (rng.random((n, 3)) < 0.4).astype(np.float32)
    mask = np.ones((n, 3), bool)
    mask[:5, 2] = False
    scores = y + np.random.default_rng(res + len(model) + len(kind)).normal(0, noise, (n, 3))
    ids = tuple(f"img{i:04d}" for i in range(n))
    aurocs = [roc_auc_score(y[mask[:, j], j], scores[mask[:, j], j]) for j in range(3)]
    record = ResultRecord(
        record_id=f"{model[-1]}{res}{kind}".ljust(16, "0")[:16],
        kind=kind,
        dataset="toy",
        model=model,
        resolution=res,
        pooling="cls+mean",
        task="multilabel",
        labels=list(LABELS),
        entry={},
        params={},
        selected={"C": 1.0},
        seed=0,
        metrics={"macro_auroc": {"point": float(np.mean(aurocs)), "low": 0.5, "high": 0.99}},
        per_label=[
            {
                "label": name,
                "auroc": a,
                "low": a - 0.1,
                "high": min(1.0, a + 0.1),
                "ap": 0.5,
                "sensitivity": 0.5,
                "specificity": 0.5,
                "n_pos": 10,
                "n_neg": 10,
            }
            for name, a in zip(LABELS, aurocs, strict=True)
        ],
        n={"train": 10, "val": 5, "test": n},
        versions={},
        elapsed_s=0.1,
        created_at="2026-01-01T00:00:00+00:00",
    )
    # Rows shuffled differently per run: the comparison must align them by image id.
    order = np.random.default_rng(res).permutation(n)
    results.write(
        record,
        ScoreTable(tuple(ids[i] for i in order), LABELS, y[order], mask[order], scores[order]),
    )
    return scores


def test_report_compares_runs_on_the_same_test_images(tmp_path: Path) -> None:
    results = ResultsDir(tmp_path / "results")
    low = _write(results, "m/a", 224, "linear", noise=1.2)
    high = _write(results, "m/a", 512, "linear", noise=0.3)
    _write(results, "m/b", 512, "linear", noise=0.8)
    built = build_report(tmp_path / "results", tmp_path / "report", n_boot=300)
    axes = sorted(c.axis for c in built.comparisons)
    assert axes == ["model", "resolution"]  # m/a 512 vs m/b 512; m/a 512 vs 224 (not m/b vs 224)
    res = next(c for c in built.comparisons if c.axis == "resolution")
    assert res.a.startswith("m/a · 512px") and res.b.startswith("m/a · 224px")
    rng = np.random.default_rng(7)
    y = (rng.random((120, 3)) < 0.4).astype(np.float32)
    mask = np.ones((120, 3), bool)
    mask[:5, 2] = False

    def macro(s: np.ndarray) -> float:
        return float(np.mean([roc_auc_score(y[mask[:, j], j], s[mask[:, j], j]) for j in range(3)]))

    assert res.delta == pytest.approx(macro(high) - macro(low))
    assert res.delta > 0 and res.low <= res.delta <= res.high
    assert res.p_value < 0.05 and res.p_adjusted >= res.p_value
    for name in ("summary.md", "summary.csv", "comparisons.md", "per_label.csv", "report.html"):
        assert (tmp_path / "report" / name).is_file()
    assert len(list((tmp_path / "report").glob("*.png"))) >= 2
    page = (tmp_path / "report" / "report.html").read_text()
    assert page.count("data:image/png;base64,") >= 2 and "http" not in page  # offline
    assert "m/b" in (tmp_path / "report" / "summary.md").read_text()


def test_report_without_records_says_what_to_run(tmp_path: Path) -> None:
    with pytest.raises(CacheNotFoundError, match="embedkit probe"):
        build_report(tmp_path, tmp_path / "out")
