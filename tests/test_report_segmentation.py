"""The report's segmentation part, from records and overlays written per the contract."""

from __future__ import annotations

import csv
import io
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from embedkit.eval import adjust_pvalues
from embedkit.report import build_report
from embedkit.report.compare import paired_dice_test
from embedkit.report.plots import caption_of, registered_plots
from embedkit.results import ResultRecord, ResultsDir, ScoreTable, load_record
from embedkit.results.consistency import MixedResultsError, check_records
from embedkit.results.segmentation import Overlays, overlays_name, write_overlays

CLASSES = ("liver", "kidney")
N = 30
IDS = tuple(f"img{i:03d}" for i in range(N))


def _ci(values: np.ndarray) -> dict[str, float]:
    return {"point": float(values.mean()), "low": float(values.min()), "high": float(values.max())}


def _seg(results: ResultsDir, kind: str, quality: float, seed: int, res: int = 224) -> np.ndarray:
    """A segmentation record + per-image Dice + overlays; returns the (N, 2) Dice."""
    rng = np.random.default_rng(seed)
    dice = np.clip(quality + rng.normal(0, 0.05, (N, 2)), 0, 1)
    iou = dice / (2 - dice)
    record = ResultRecord(
        record_id=f"seg{kind}{res}".ljust(16, "0")[:16], kind=kind, dataset="organs",
        model="test/tiny-dinov2", resolution=res, pooling="patch", task="segmentation",
        labels=list(CLASSES), entry={"ids_digest": "abc"}, params={}, selected={}, seed=0,
        metrics={"dice": _ci(dice.mean(1)), "iou": _ci(iou.mean(1))},
        per_label=[{"label": c, "dice": _ci(dice[:, j]), "iou": _ci(iou[:, j])}
                   for j, c in enumerate(CLASSES)],
        n={"train": 60, "val": 10, "test": N}, versions={}, elapsed_s=1.0,
        created_at="2026-01-01T00:00:00+00:00",
    )  # fmt: skip
    order = rng.permutation(N)  # rows stored in another order per run: paired by id
    best_worst = np.argsort(-dice.mean(1))[[0, 1, -2, -1]]
    truth = np.zeros((4, 32, 32), np.int64)
    truth[:, 8:20, 8:20] = 1
    truth[:, 22:28, 4:12] = 2
    overlays = Overlays(
        image=rng.random((4, 32, 32)).astype(np.float32), truth=truth,
        pred=np.roll(truth, 2, axis=2), ids=np.asarray([IDS[i] for i in best_worst]),
        mean_dice=dice.mean(1)[best_worst],
    )  # fmt: skip
    record.extra["overlays"] = overlays_name(record)
    write_overlays(results, record, overlays)
    y = np.ones((N, 2), np.float32)
    scores = ScoreTable(tuple(IDS[i] for i in order), CLASSES, y[order],
                        np.ones((N, 2), bool), dice[order])  # fmt: skip
    results.write(record, scores)
    return dice


def _classification(results: ResultsDir, kind: str, seed: int) -> None:
    rng = np.random.default_rng(seed)
    y = (np.random.default_rng(0).random((N, 1)) < 0.5).astype(np.float32)
    record = ResultRecord(
        record_id=f"cls{kind}".ljust(16, "0")[:16], kind=kind, dataset="organs",
        model="test/tiny-dinov2", resolution=224, pooling="cls", task="multilabel",
        labels=["tumour"], entry={}, params={}, selected={"C": 1.0}, seed=0,
        metrics={"macro_auroc": {"point": 0.7, "low": 0.6, "high": 0.8}},
        per_label=[{"label": "tumour", "auroc": 0.7, "low": 0.6, "high": 0.8, "ap": 0.6,
                    "sensitivity": 0.5, "specificity": 0.5, "n_pos": 15, "n_neg": 15}],
        n={"train": 60, "val": 10, "test": N}, versions={}, elapsed_s=1.0,
        created_at="2026-01-01T00:00:00+00:00",
    )  # fmt: skip
    scores = ScoreTable(IDS, ("tumour",), y, np.ones((N, 1), bool), y + rng.normal(0, 1, (N, 1)))
    results.write(record, scores)


@pytest.fixture
def seg_results(tmp_path: Path) -> tuple[Path, dict[str, np.ndarray]]:
    """Three segmentation runs (frozen probe, two finetunes) and two classification runs of one
    dataset name and test set."""
    results = ResultsDir(tmp_path / "results")
    dice = {
        "segmentation": _seg(results, "segmentation", 0.6, 1),
        "finetune-full": _seg(results, "finetune-full", 0.8, 2),
        "finetune-lora": _seg(results, "finetune-lora", 0.61, 3),
    }
    _classification(results, "linear", 4)
    _classification(results, "knn", 5)
    return results.root, dice


def test_tables_comparisons_sentences_and_overlays(
    seg_results: tuple[Path, dict[str, np.ndarray]], tmp_path: Path
) -> None:
    root, dice = seg_results
    report = build_report(root, tmp_path / "report", n_boot=300)
    rows = {r.method: r for r in report.summary}
    for kind, d in dice.items():
        assert rows[kind].metric == "mean_dice"
        assert np.isclose(rows[kind].point, d.mean(1).mean())
    assert rows["linear"].metric == "macro_auroc"

    seg = [c for c in report.comparisons if c.metric == "mean_dice"]
    cls = [c for c in report.comparisons if c.metric == "macro_auroc"]
    assert len(seg) == 3 and len(cls) == 1  # three seg pairs by method, one classification pair
    names = {"segmentation", "finetune-full", "finetune-lora"}
    for c in seg:
        a, b = (c.a.rsplit(" · ", 1)[1], c.b.rsplit(" · ", 1)[1])
        assert {a, b} <= names
        assert np.isclose(c.delta, dice[a].mean(1).mean() - dice[b].mean(1).mean())
        assert c.low <= c.delta <= c.high
    # Holm across the whole report: classification and segmentation p-values together
    raw = np.array([c.p_value for c in report.comparisons])
    assert np.allclose([c.p_adjusted for c in report.comparisons], adjust_pvalues(raw, "holm"))
    assert all(c.test.startswith("paired sign-flip permutation") for c in seg)
    assert cls[0].test.startswith("paired permutation (ranks)")
    md_comparisons = (report.out / "comparisons.md").read_text()
    assert "sign-flip permutation (per-image mean Dice)" in md_comparisons
    assert "| mean_dice +" in md_comparisons or "| mean_dice -" in md_comparisons
    full_vs_probe = next(
        c
        for c in seg
        if {c.a, c.b}
        >= {"test/tiny-dinov2 · 224px · finetune-full", "test/tiny-dinov2 · 224px · segmentation"}
    )
    assert full_vs_probe.p_adjusted < 0.01  # 0.8 vs 0.6 on every image

    page = report.html.read_text()
    first_screen = page[: page.index("Headline metric")]
    assert "finetune-full is better than" in first_screen.replace("224px · ", "")
    assert "mean Dice" in first_screen
    assert re.search(r"segments with mean Dice 0\.\d{3} \(95% CI", first_screen)
    assert "Segmentation: Dice and IoU per class" in page
    for name in (*CLASSES, "mean over classes"):
        assert f"<td>{name}</td>" in page
    assert page.count("Dice [95% CI]") == 3  # one table per segmentation run

    md = (report.out / "segmentation.md").read_text()
    assert md.count("| liver |") == 3
    table = list(csv.DictReader(io.StringIO((report.out / "segmentation.csv").read_text())))
    full_liver = next(r for r in table if r["method"] == "finetune-full" and r["class"] == "liver")
    assert np.isclose(float(full_liver["dice"]), dice["finetune-full"][:, 0].mean())
    assert "liver" not in (report.out / "per_label.md").read_text()  # classification only

    assert "segmentation_overlays" in registered_plots()
    figures = sorted(report.out.glob("overlays_*.png"))
    assert len(figures) == 3
    caption = caption_of(figures[0])
    assert "highest" in caption and "ground-truth" in caption and "1: liver" in caption
    assert caption in page  # captioned in words on the page


def test_paired_dice_test() -> None:
    rng = np.random.default_rng(0)
    a = rng.random((40, 3))
    same = paired_dice_test(a, a, n_boot=200, n_perm=500)
    assert same.delta == 0 and same.p_value == 1.0
    shifted = paired_dice_test(np.clip(a + 0.1, 0, 2), a, n_boot=200, n_perm=500)
    assert np.isclose(shifted.delta, 0.1) and shifted.p_value == 1 / 501
    noise = paired_dice_test(a, rng.permutation(a), n_boot=200, n_perm=500)
    assert noise.low <= noise.delta <= noise.high and noise.p_value > 0.01
    with pytest.raises(ValueError, match="one shape"):
        paired_dice_test(a, a[:, :2])


def test_segmentation_records_do_not_make_a_results_folder_mixed(
    seg_results: tuple[Path, dict[str, np.ndarray]], tmp_path: Path
) -> None:
    """Segmentation and classification records of one dataset are checked each among their
    own kind (different labels and tasks are not different manifests)."""
    root, _ = seg_results
    pairs = [(load_record(p), p) for p in sorted(root.rglob("*.json"))]
    check_records(pairs)


def test_segmentation_records_of_another_test_set_are_refused(
    seg_results: tuple[Path, dict[str, np.ndarray]], tmp_path: Path
) -> None:
    root, _ = seg_results
    results = ResultsDir(root)
    _seg(results, "finetune-bitfit", 0.7, 9)
    path = next(root.rglob("*finetune-bitfit*.parquet"))
    table = pq.read_table(path).to_pydict()
    table["y:liver"] = [0.0] * N  # another mask set: the classes present differ
    pq.write_table(pa.table(table), path)
    with pytest.raises(MixedResultsError, match="test targets differ"):
        build_report(root, tmp_path / "report", n_boot=100)
