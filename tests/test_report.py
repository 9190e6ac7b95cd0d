"""Reports from result records alone: tables, paired comparisons, plots, one offline HTML page."""

from __future__ import annotations

import csv
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from sklearn.metrics import roc_auc_score

from embedkit.errors import CacheNotFoundError
from embedkit.eval import bootstrap_indices, paired_bootstrap_test
from embedkit.eval.permutation import paired_permutation_test
from embedkit.report import PairChoice, RunPair, RunSelector, build_report
from embedkit.results import ResultRecord, ResultsDir, ScoreTable
from embedkit.results.consistency import MixedResultsError

LABELS = ("A", "B", "C")


def _write(
    results: ResultsDir,
    model: str,
    res: int,
    kind: str,
    noise: float,
    requested: int | None = None,
) -> np.ndarray:
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
        requested_resolution=requested,
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


def test_report_can_be_limited_to_chosen_pairs(tmp_path: Path) -> None:
    results = ResultsDir(tmp_path / "results")
    _write(results, "m/a", 224, "linear", noise=1.2)
    _write(results, "m/a", 512, "linear", noise=0.3)
    _write(results, "m/b", 512, "linear", noise=0.8)
    chosen = [PairChoice("resolution", "224", "512")]  # A = 224 px, against the default order
    built = build_report(tmp_path / "results", tmp_path / "r1", n_boot=100, pairs=chosen)
    [only] = built.comparisons
    assert only.axis == "resolution" and only.a.startswith("m/a · 224px")
    assert only.delta < 0 and only.p_adjusted == only.p_value  # one test: nothing to correct
    models = build_report(tmp_path / "results", tmp_path / "r2", n_boot=100,
                          pairs=[PairChoice("model")]).comparisons  # fmt: skip
    assert [c.axis for c in models] == ["model"]
    with pytest.raises(ValueError, match="both values of a pair or neither"):
        PairChoice("model", "m/a")


def _toy_truth() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(7)
    y = (rng.random((120, 3)) < 0.4).astype(np.float32)
    mask = np.ones((120, 3), bool)
    mask[:5, 2] = False
    return y, mask


def test_p_values_are_permutation_tests_and_cis_fixed_label_set_bootstraps(tmp_path: Path) -> None:
    results = ResultsDir(tmp_path / "results")
    a = _write(results, "m/a", 512, "linear", noise=0.9)
    b = _write(results, "m/b", 512, "linear", noise=1.0)
    [c] = build_report(tmp_path / "results", tmp_path / "report", n_boot=200).comparisons
    y, mask = _toy_truth()
    perm = paired_permutation_test(y, mask, a, b, n_perm=2000, seed=0)
    boot = paired_bootstrap_test(
        y, mask, a, b, bootstrap_indices(120, 200, seed=0, targets=y, mask=mask)
    )
    assert c.p_value == perm.p_value and c.n_resamples == 2000
    assert (c.delta, c.low, c.high) == pytest.approx((boot.delta, *boot.ci))
    assert "permutation" in c.test
    text = (tmp_path / "report" / "comparisons.md").read_text()
    assert "paired permutation" in text and "paired bootstrap percentile" in text
    assert "paired permutation" in (tmp_path / "report" / "report.html").read_text()


def test_runs_pair_by_resolution_tier_not_by_the_snapped_size(tmp_path: Path) -> None:
    results = ResultsDir(tmp_path / "results")
    _write(results, "dinov2/base", 518, "linear", noise=0.9, requested=512)
    _write(results, "dinov2/base", 224, "linear", noise=1.0, requested=224)
    _write(results, "dinov3/vitb16", 512, "linear", noise=0.8)  # an old record: tier = 512
    found = {
        (c.axis, c.a, c.b)
        for c in build_report(tmp_path / "results", tmp_path / "r", n_boot=50).comparisons
    }
    assert found == {
        ("resolution", "dinov2/base · 512px (518) · linear", "dinov2/base · 224px · linear"),
        ("model", "dinov2/base · 512px (518) · linear", "dinov3/vitb16 · 512px · linear"),
    }


def test_run_selectors_pair_runs_differing_in_model_and_method(tmp_path: Path) -> None:
    results = ResultsDir(tmp_path / "results")
    for res in (224, 512):
        _write(results, "dinov3/vit7b16", res, "linear", noise=0.7)
        _write(results, "dinov3/vitb16", res, "finetune-full", noise=0.9)
        _write(results, "imagenet/vit-base16", res, "finetune-full", noise=1.1)
    frozen_vs_ft = RunPair(
        RunSelector(model="dinov3/vit7b16", method="linear"),
        RunSelector(model="dinov3/vitb16", method="full"),
    )
    built = build_report(tmp_path / "results", tmp_path / "r", n_boot=50, pairs=[frozen_vs_ft])
    got = sorted((c.axis, c.a, c.b) for c in built.comparisons)
    assert got == [
        (
            "model, method",
            f"dinov3/vit7b16 · {res}px · linear",
            f"dinov3/vitb16 · {res}px · finetune-full",
        )
        for res in (224, 512)
    ]  # paired at each tier (an attribute neither selector names must agree), A = 7B
    one = RunPair(RunSelector(model="dinov3/vitb16"), RunSelector(model="imagenet/vit-base16"))
    both = build_report(
        tmp_path / "results", tmp_path / "r2", n_boot=50, pairs=[frozen_vs_ft, one]
    ).comparisons
    assert len(both) == 4
    p = np.array([c.p_value for c in both])
    holm = np.minimum(1, np.maximum.accumulate(np.sort(p) * (4 - np.arange(4))))
    assert sorted(c.p_adjusted for c in both) == pytest.approx(list(holm))
    with pytest.raises(ValueError, match="at least one"):
        RunSelector()


def test_report_without_records_says_what_to_run(tmp_path: Path) -> None:
    with pytest.raises(CacheNotFoundError, match="embedkit probe"):
        build_report(tmp_path, tmp_path / "out")


def test_report_numbers_equal_the_stored_records(tmp_path: Path) -> None:
    """Every number of summary.csv / per_label.csv, and the HTML cells, is read from the
    records on disk (here edited after writing, so nothing can be recomputed instead)."""
    results = ResultsDir(tmp_path / "results")
    _write(results, "m/a", 224, "linear", noise=1.2)
    _write(results, "m/b", 224, "knn", noise=0.5)
    for path in (tmp_path / "results").rglob("*.json"):
        doc = json.loads(path.read_text())
        doc["metrics"]["macro_auroc"] = {"point": 0.6123, "low": 0.5011, "high": 0.7342}
        doc["per_label"][1]["auroc"] = 0.4321
        path.write_text(json.dumps(doc))
    stored = {r.record_id: r for r in ResultsDir(tmp_path / "results").records()}
    build_report(tmp_path / "results", tmp_path / "report", n_boot=100)

    with (tmp_path / "report" / "summary.csv").open() as fh:
        summary = list(csv.DictReader(fh))
    assert {row["record_id"] for row in summary} == set(stored)
    for row in summary:
        record = stored[row["record_id"]]
        metric = record.metrics["macro_auroc"]
        assert (float(row["point"]), float(row["low"]), float(row["high"])) == (
            metric["point"], metric["low"], metric["high"],
        )  # fmt: skip
        assert (row["model"], int(row["resolution"]), row["method"]) == (
            record.model, record.resolution, record.kind,
        )  # fmt: skip
        assert int(row["n_test"]) == record.n["test"]
    with (tmp_path / "report" / "per_label.csv").open() as fh:
        per_label = list(csv.DictReader(fh))
    assert len(per_label) == sum(len(r.per_label) for r in stored.values())
    by_key = {(r.model, row["label"]): row for r in stored.values() for row in r.per_label}
    for row in per_label:
        assert float(row["auroc"]) == by_key[(row["model"], row["label"])]["auroc"]
    page = (tmp_path / "report" / "report.html").read_text()
    assert page.count("0.612 [0.501, 0.734]") == 2 and page.count("0.432 [") == 2


def test_report_refuses_records_of_two_manifests_under_one_dataset_name(tmp_path: Path) -> None:
    results = ResultsDir(tmp_path / "results")
    _write(results, "m/a", 224, "linear", noise=1.2)
    _write(results, "m/a", 512, "linear", noise=0.3)
    build_report(tmp_path / "results", tmp_path / "ok", n_boot=50)  # consistent: fine
    path = next((tmp_path / "results").rglob("*512*/*.json"))
    doc = json.loads(path.read_text())
    doc["entry"] = {"ids_digest": "b" * 64}  # another image list under the name 'toy'
    path.write_text(json.dumps(doc))
    other = next(p for p in (tmp_path / "results").rglob("*.json") if p != path)
    doc = json.loads(other.read_text())
    doc["entry"] = {"ids_digest": "a" * 64}
    other.write_text(json.dumps(doc))
    with pytest.raises(MixedResultsError, match=r"dataset 'toy' has records of 2 different"):
        build_report(tmp_path / "results", tmp_path / "mixed", n_boot=50)
    assert not (tmp_path / "mixed").exists()

    # Same image list and labels, but the test targets of an image differ (another label
    # policy): refused too.
    doc["entry"] = {"ids_digest": "b" * 64}
    other.write_text(json.dumps(doc))
    scores = pq.read_table(path.with_suffix(".parquet")).to_pydict()
    scores["y:A"] = [1.0 - v for v in scores["y:A"]]
    pq.write_table(pa.table(scores), path.with_suffix(".parquet"))
    with pytest.raises(MixedResultsError, match="test targets differ"):
        build_report(tmp_path / "results", tmp_path / "mixed", n_boot=50)


CHROMIUM = next(
    (p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None
)
# Reports where each figure is and whether its PNG decoded, once the page has loaded.
_PROBE = """<script>addEventListener("load", () => { document.body.setAttribute("data-images",
  [...document.images].map(i => { const r = i.getBoundingClientRect();
    return [i.naturalWidth, i.naturalHeight, r.left, r.top, r.width, r.height]
      .map(Math.round).join(" "); }).join(";")); });</script>"""


def _chromium(tmp: Path, *args: str) -> subprocess.CompletedProcess[str]:
    assert CHROMIUM is not None
    cmd = [
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--no-first-run", f"--user-data-dir={tmp / 'chromium-profile'}", *args,
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.slow
@pytest.mark.skipif(
    CHROMIUM is None, reason="chromium is not installed (Debian: apt-get install -y chromium)"
)
def test_report_renders_in_headless_chromium_with_its_plots_visible(tmp_path: Path) -> None:
    results = ResultsDir(tmp_path / "results")
    _write(results, "m/a", 224, "linear", noise=1.2)
    _write(results, "m/a", 512, "linear", noise=0.3)
    _write(results, "m/b", 512, "linear", noise=0.8)
    built = build_report(tmp_path / "results", tmp_path / "report", n_boot=200)
    n_plots = len(list((tmp_path / "report").glob("*.png")))
    assert n_plots >= 2

    # 1. In the browser every embedded figure decodes, and the layout says where it is.
    probe = tmp_path / "report" / "probe.html"
    probe.write_text(built.html.read_text().replace("</body>", _PROBE + "</body>"))
    width = 1280
    dom = _chromium(
        tmp_path, f"--window-size={width},1000", "--virtual-time-budget=10000", "--dump-dom",
        probe.as_uri(),
    ).stdout  # fmt: skip
    found = re.search(r'data-images="([^"]*)"', dom)
    assert found is not None, dom[-2000:]
    boxes = [[int(v) for v in item.split()] for item in found[1].split(";")]
    assert len(boxes) == n_plots
    assert all(natural_w > 0 and natural_h > 0 for natural_w, natural_h, *_ in boxes)

    # 2. A screenshot of the report itself shows each figure: inside every figure's box there
    # are dark (axes, text) and coloured (lines, bars, CI bands) pixels, outside of the
    # tables, which are black on white and grey.
    height = max(top + h for *_, top, _w, h in boxes) + 40
    shot = tmp_path / "report.png"
    _chromium(tmp_path, f"--window-size={width},{height}", f"--screenshot={shot}",
              built.html.as_uri())  # fmt: skip
    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(np.int16)
    assert pixels.shape[:2] == (height, width)
    for _nw, _nh, left, top, w, h in boxes:
        region = pixels[top : top + h, left : left + w]
        assert region.size > 0
        dark = (region.max(axis=2) < 100).mean()
        coloured = ((region.max(axis=2) - region.min(axis=2)) > 60).mean()
        assert dark > 0.002 and coloured > 0.002, (left, top, dark, coloured)
    above = pixels[: min(top for *_, top, _w, _h in boxes)]  # headings and tables only
    assert ((above.max(axis=2) - above.min(axis=2)) > 60).mean() < 0.0005


def _fewshot_record(model: str, shots: tuple[int, ...]) -> ResultRecord:
    summary = {
        f"{n}-shot": {
            "macro_auroc": {"mean": 0.5 + 0.02 * n, "std": 0.01, "ci_low": 0.48 + 0.02 * n,
                            "ci_high": 0.52 + 0.02 * n, "n": 5},
            "macro_ap": {"mean": 0.4, "std": 0.02, "ci_low": 0.38, "ci_high": 0.42, "n": 5},
        }
        for n in shots
    }  # fmt: skip
    return ResultRecord(
        record_id=f"fs{model[-1]}".ljust(16, "0"), kind="fewshot", dataset="toy", model=model,
        resolution=224, pooling="cls+mean", task="multilabel", labels=list(LABELS), entry={},
        params={}, selected={}, seed=0, metrics=summary, per_label=[],
        n={"train": 10, "val": 5, "test": 120}, versions={}, elapsed_s=0.1,
        created_at="2026-01-01T00:00:00+00:00", curve="shots",
    )  # fmt: skip


def test_report_reads_a_declared_curve_and_renders_finetune_records(tmp_path: Path) -> None:
    """Few-shot records are read through what they declare (``curve``), including records
    written before the field existed; a finetune record renders like a probe's."""
    from rich.console import Console

    from embedkit.probes.run import comparison_table, render_record
    from embedkit.results import load_record

    results = ResultsDir(tmp_path / "results")
    _write(results, "m/a", 224, "linear", noise=1.2)
    _write(results, "m/a", 224, "finetune-lora", noise=0.3)
    results.write(_fewshot_record("m/a", (1, 4, 16)), None)
    legacy = _fewshot_record("m/b", (2, 8))
    path = results.write(legacy, None)
    doc = json.loads(path.read_text())
    del doc["curve"]  # a record written before records declared their curve
    path.write_text(json.dumps(doc))
    assert load_record(path).curve == "shots"

    built = build_report(tmp_path / "results", tmp_path / "report", n_boot=100)
    rows = {(s.model, s.method): s for s in built.summary}
    fs = rows[("m/a", "fewshot")]
    assert fs.metric == "16-shot macro_auroc" and fs.curve == "shots"
    assert (fs.point, fs.low, fs.high) == pytest.approx((0.82, 0.8, 0.84))
    assert rows[("m/b", "fewshot")].metric == "8-shot macro_auroc"
    assert rows[("m/a", "finetune-lora")].curve is None
    [pair] = built.comparisons  # linear vs finetune-lora; curves have no per-image scores
    assert pair.axis == "method" and {pair.a, pair.b} == {
        "m/a · 224px · linear", "m/a · 224px · finetune-lora",
    }  # fmt: skip
    assert (tmp_path / "report" / "fewshot_toy.png").is_file()
    records = ResultsDir(tmp_path / "results").records()
    console = Console(width=200, record=True)
    for record in records:
        console.print(render_record(record))
    console.print(comparison_table(records))
    text = console.export_text()
    assert "0.820 ± 0.010" in text  # the 16-shot row of the curve table
    assert "finetune-lora · toy" in text and "16-shot macro_auroc 0.820 [0.800, 0.840]" in text
