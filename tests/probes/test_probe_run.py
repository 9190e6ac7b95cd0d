"""`run_probe`: cached features ─► probe ─► metrics with CIs ─► a reusable result record."""

from __future__ import annotations

import re
from collections.abc import Collection
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from sklearn.metrics import roc_auc_score

from embedkit.errors import CacheNotFoundError, EmbedkitError, MixedResultsError
from embedkit.extract import ExtractionRequest, extract
from embedkit.manifest import load_manifest
from embedkit.probes import KindResult, ProbeData
from embedkit.probes.run import ProbeRequest, run_probe
from embedkit.results import load_scores
from embedkit.store.layout import COMPLETE_FILE


@pytest.fixture
def extracted(demo_manifest: Path, model_cache: Path) -> Path:
    request = ExtractionRequest(
        model="test/tiny-dinov3-vit", dataset="demo", resolution=224, num_workers=0, unit_rows=8
    )
    extract(request, manifest=demo_manifest, model_cache_dir=model_cache)
    return demo_manifest


def _probe(kind: str, **kw: object) -> ProbeRequest:
    args: dict[str, object] = {
        "kind": kind,
        "model": "test/tiny-dinov3-vit",
        "dataset": "demo",
        "resolution": 224,
        "max_iter": 100,
        "n_boot": 200,
    }
    args.update(kw)
    return ProbeRequest(**args)  # type: ignore[arg-type]


def test_linear_probe_record_metrics_match_its_saved_scores(
    extracted: Path, tmp_path: Path
) -> None:
    outcome = run_probe(_probe("linear"), manifest=extracted, results=tmp_path)
    record = outcome.record
    assert not outcome.reused and outcome.path.is_file()
    assert record.pooling == "cls+mean" and record.task == "multilabel"
    assert np.isclose(record.selected["C"], np.logspace(-6, 5, 45)).any()  # the DINOv2 grid
    table = load_manifest(extracted).dataset("demo").load()
    scores = load_scores(outcome.path)
    assert scores.ids == tuple(table.ids[i] for i in table.indices("test"))
    aurocs = []
    for j, row in enumerate(record.per_label):
        y, m, s = scores.y[:, j], scores.mask[:, j], scores.scores[:, j]
        if row["auroc"] is None:
            assert len(np.unique(y[m])) < 2  # undefined exactly when one class is missing
            continue
        expected = roc_auc_score(y[m], s[m])
        assert row["auroc"] == pytest.approx(expected)
        assert row["low"] <= row["auroc"] <= row["high"]
        aurocs.append(expected)
    assert record.metrics["macro_auroc"]["point"] == pytest.approx(np.mean(aurocs))
    assert record.entry["digest"] and record.n["test"] == len(scores.ids)


def test_identical_probe_is_reused_and_overwrite_recomputes(
    extracted: Path, tmp_path: Path
) -> None:
    first = run_probe(_probe("knn"), manifest=extracted, results=tmp_path)
    again = run_probe(_probe("knn"), manifest=extracted, results=tmp_path)
    assert again.reused and again.path == first.path
    assert again.record.metrics == first.record.metrics
    assert 1 <= again.record.selected["k"] <= first.record.n["train"]
    other_seed = run_probe(_probe("knn", seed=1), manifest=extracted, results=tmp_path)
    assert not other_seed.reused and other_seed.path != first.path
    redone = run_probe(_probe("knn", overwrite=True), manifest=extracted, results=tmp_path)
    assert not redone.reused and redone.path == first.path


def test_missing_entry_says_which_command_extracts_it(demo_manifest: Path, tmp_path: Path) -> None:
    with pytest.raises(CacheNotFoundError, match="embedkit extract --model test/tiny-dinov3-vit"):
        run_probe(_probe("linear", resolution=256), manifest=demo_manifest, results=tmp_path)


def test_fewshot_with_too_few_patients_is_a_clear_error(extracted: Path, tmp_path: Path) -> None:
    with pytest.raises(EmbedkitError, match="eligible patients"):
        run_probe(_probe("fewshot", shots=(16,)), manifest=extracted, results=tmp_path)


def test_cli_probe_reads_through_a_local_cache(
    extracted: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`embedkit probe --local-cache DIR`: same record as a direct read, then no remote data."""
    import json

    from typer.testing import CliRunner

    from embedkit.cli import app
    from embedkit.store import CacheRoot, list_entries

    shared = CacheRoot.from_uri(load_manifest(extracted).cache)
    (summary,) = list_entries(shared)
    base = ["probe", "--kind", "knn", "--model", "test/tiny-dinov3-vit", "--dataset", "demo",
            "--resolution", "224", "--n-boot", "50", "--manifest", str(extracted)]  # fmt: skip
    runner = CliRunner()
    direct = runner.invoke(app, [*base, "--out", str(tmp_path / "direct")])
    assert direct.exit_code == 0, direct.output
    local = tmp_path / "local"
    through = runner.invoke(
        app, [*base, "--out", str(tmp_path / "rt"), "--local-cache", str(local)]
    )
    assert through.exit_code == 0, through.output
    assert (local / summary.relpath / COMPLETE_FILE).is_file()  # a verified local copy

    def record(out: str) -> dict[str, object]:
        (path,) = (tmp_path / out).rglob("knn-*.json")
        return dict(json.loads(path.read_text()))

    assert record("rt")["metrics"] == record("direct")["metrics"]
    assert record("rt")["entry"] == record("direct")["entry"]  # names the shared entry

    # Warm: the shared entry's chunk objects are gone, the probe still runs from the local
    # copy (here found through EMBEDKIT_LOCAL_CACHE).
    chunks = [
        p
        for p in shared.files(summary.relpath)
        if re.search(r"/c[./]\d", p) and not p.startswith("image/")
    ]
    assert chunks  # the feature chunks of both poolings and the validity mask
    for path in chunks:
        shared.remove_tree(f"{summary.relpath}/{path}")
    monkeypatch.setenv("EMBEDKIT_LOCAL_CACHE", str(local))
    warm = runner.invoke(app, [*base, "--out", str(tmp_path / "rt"), "--overwrite"])
    assert warm.exit_code == 0, warm.output
    assert record("rt")["metrics"] == record("direct")["metrics"]


def test_features_read_by_blocks_equal_one_read(extracted: Path) -> None:
    from embedkit.probes.features import read_features
    from embedkit.probes.run import find_probe_entry
    from embedkit.store import CacheRoot

    man = load_manifest(extracted)
    entry = find_probe_entry(CacheRoot.from_uri(man.cache), "demo", "test/tiny-dinov3-vit", 224)
    ids = list(np.random.default_rng(0).permutation(entry.ids))
    whole = entry.read("cls+mean", ids=ids)
    for block_rows in (1, 3, len(ids), len(ids) + 5):
        got = read_features(entry, "cls+mean", ids, block_rows=block_rows)
        assert got.dtype == whole.dtype == np.float16
        np.testing.assert_array_equal(got, whole)


def test_sgd_kind_chooses_lr_on_validation_and_writes_a_scored_record(
    extracted: Path, tmp_path: Path
) -> None:
    from embedkit.probes import DINO_LR_GRID, SGDLinearProbe
    from embedkit.probes.features import split_features
    from embedkit.probes.run import find_probe_entry, render_record
    from embedkit.store import CacheRoot

    outcome = run_probe(_probe("sgd"), manifest=extracted, results=tmp_path)
    record = outcome.record
    assert record.kind == "sgd" and record.curve is None and outcome.path.name.startswith("sgd-")
    assert record.pooling == "cls+mean" and record.params["lrs"] == list(DINO_LR_GRID)
    assert record.selected["lr"] in DINO_LR_GRID
    per_lr = record.extra["val_score_per_lr"]
    finite = {float(k): v for k, v in per_lr.items() if np.isfinite(v)}
    best = max(finite.values())
    assert finite[record.selected["lr"]] == best  # the best validation macro AUROC ...
    assert record.selected["lr"] == min(lr for lr, v in finite.items() if v == best)  # ties: small
    # The saved test scores are those of the estimator fitted by the documented rule.
    man = load_manifest(extracted)
    entry = find_probe_entry(CacheRoot.from_uri(man.cache), "demo", "test/tiny-dinov3-vit", 224)
    table = man.dataset("demo").load()
    tr, va, te = (split_features(entry, table, s, "cls+mean") for s in ("train", "val", "test"))
    probe = SGDLinearProbe(seed=0).fit_select(tr.X, tr.y, tr.mask, va.X, va.y, va.mask)
    assert probe.lr_ == record.selected["lr"]
    scores = load_scores(outcome.path)
    np.testing.assert_allclose(scores.scores, probe.predict_proba(te.X))
    m = scores.mask[:, 0]
    row = record.per_label[0]
    if row["auroc"] is not None:
        assert row["auroc"] == pytest.approx(roc_auc_score(scores.y[m, 0], scores.scores[m, 0]))
    assert (
        render_record(record).title
        and run_probe(_probe("sgd"), manifest=extracted, results=tmp_path).reused
    )


def test_fewshot_kind_returns_a_curve_over_shots_from_the_train_split() -> None:
    from embedkit.probes import get_kind, run_fewshot
    from embedkit.probes.features import SplitFeatures
    from embedkit.probes.registry import ProbeData

    rng = np.random.default_rng(0)

    def part(name: str, n: int) -> SplitFeatures:
        y = (rng.random((n, 2)) < 0.4).astype(np.float32)
        X = (rng.normal(size=(n, 8)) + 2 * y[:, :1]).astype(np.float16)
        patients = tuple(f"{name}{i // 2}" for i in range(n))  # two images per patient
        ids = tuple(f"{name}-{i}" for i in range(n))
        return SplitFeatures(name, "cls+mean", X, ids, y, np.ones_like(y, bool), patients, 0)

    train, val, test = part("train", 80), part("val", 0), part("test", 30)
    kind = get_kind("fewshot")
    request = _probe("fewshot", shots=(1, 2, 64), draws=3, seed=4)
    data = ProbeData(train, val, test, ("A", "B"), "multilabel", "toy")
    result = kind.fit_score(request, data)
    assert kind.curve == "shots" and result.scores is None and result.selected == {}
    assert result.metrics is not None and list(result.metrics) == ["1-shot", "2-shot"]
    assert result.notes == [
        "64-shot skipped: 'A' positives: "
        f"{len({p for p, y in zip(train.patients, train.y[:, 0], strict=True) if y})} eligible "
        "patients, 64 needed; use fewer shots."
    ]
    ref = run_fewshot(train.X, train.y, train.mask, np.asarray(train.patients), test.X, test.y,
                      test.mask, shots=(1, 2), seeds=range(4, 7))  # fmt: skip
    assert result.metrics["2-shot"] == ref.summary[2]
    assert set(result.extra["runs"]) == {f"{n}-shot/seed{s}" for n in (1, 2) for s in (4, 5, 6)}


def test_unknown_kind_lists_the_registered_ones() -> None:
    from embedkit.errors import ConfigError
    from embedkit.probes import PROBE_KINDS

    assert PROBE_KINDS == ("linear", "knn", "fewshot", "sgd", "segmentation")
    with pytest.raises(ConfigError, match=r"unknown probe kind 'knm'; did you mean 'knn'\?"):
        _probe("knm")
    with pytest.raises(
        ConfigError, match=r"choose one of \['linear', 'knn', 'fewshot', 'sgd', 'segmentation'\]"
    ):
        _probe("ridge")


class _CentroidKind:
    """A probe kind written as a newcomer would: cosine to the positive minus the negative class
    mean per label. One class and one registration; nothing else changes."""

    name = "centroid"
    curve = None

    def default_pooling(self, stored: Collection[str]) -> str:
        return "cls"

    def params(self, request: ProbeRequest) -> dict[str, Any]:
        return {"similarity": "cosine"}

    def fit_score(self, request: ProbeRequest, data: ProbeData) -> KindResult:
        train, test = data.train, data.test

        def unit(a: np.ndarray) -> np.ndarray:
            a = a.astype(np.float64)
            return a / np.linalg.norm(a, axis=-1, keepdims=True)

        Xtr, Xte = unit(train.X), unit(test.X)
        scores = np.zeros((len(Xte), train.y.shape[1]))
        for j in range(train.y.shape[1]):
            valid = train.mask[:, j]
            pos = valid & (train.y[:, j] == 1)
            neg = valid & (train.y[:, j] == 0)
            if pos.any() and neg.any():
                scores[:, j] = Xte @ (unit(Xtr[pos].mean(0)) - unit(Xtr[neg].mean(0)))
        return KindResult({}, {"n_train": len(Xtr)}, scores=scores)


def test_a_new_kind_is_one_class_and_one_registration(
    extracted: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from embedkit.errors import ConfigError
    from embedkit.probes import registry
    from embedkit.report import build_report

    kind = _CentroidKind()
    monkeypatch.setitem(registry._KINDS, kind.name, kind)  # register(kind), undone afterwards
    with pytest.raises(ConfigError, match="already registered"):
        registry.register(kind)
    outcome = run_probe(_probe("centroid"), manifest=extracted, results=tmp_path / "results")
    record = outcome.record
    assert (record.kind, record.pooling, record.curve) == ("centroid", "cls", None)
    assert record.params["similarity"] == "cosine" and record.extra["n_train"] == record.n["train"]
    assert outcome.path.name.startswith("centroid-")
    scores = load_scores(outcome.path)
    assert scores.scores.shape == (record.n["test"], len(record.labels))
    run_probe(_probe("linear"), manifest=extracted, results=tmp_path / "results")
    built = build_report(tmp_path / "results", tmp_path / "report", n_boot=50)
    assert {row.method for row in built.summary} == {"centroid", "linear"}
    assert [c.axis for c in built.comparisons] == ["method"]  # paired on the same test images


# Every kind with test scores; few-shot goes through the same column drop, but the demo's train
# split has too few patients for any shot count (see the test above).
@pytest.mark.parametrize("kind", ["linear", "knn", "sgd"])
def test_a_label_with_one_class_in_train_is_reported_and_the_probe_goes_on(
    extracted: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    import dataclasses

    import embedkit.probes.run as run_module

    real = vars(run_module)["split_features"]
    seen: dict[str, int] = {}

    def no_positive_for_label_0(entry, table, split, pooling):  # type: ignore[no-untyped-def]
        part = real(entry, table, split, pooling)
        if split != "train":
            return part
        y = part.y.copy()
        y[:, 0] = 0.0
        seen["labels"] = y.shape[1]
        return dataclasses.replace(part, y=y)

    monkeypatch.setattr(run_module, "split_features", no_positive_for_label_0)
    record = run_probe(_probe(kind), manifest=extracted, results=tmp_path).record
    name = record.labels[0]
    assert any(n.startswith(f"'{name}' has 0 positives") and "in train" in n for n in record.notes)
    row = record.per_label[0]
    assert row["auroc"] is None and row["sensitivity"] is None
    assert all(r["auroc"] is not None or r["n_pos"] * r["n_neg"] == 0 for r in record.per_label[1:])
    scores = load_scores(tmp_path / (record.relpath() + ".json"))
    assert np.isnan(scores.scores[:, 0]).all() and np.isfinite(scores.scores[:, 1:]).all()
    defined = [
        roc_auc_score(scores.y[scores.mask[:, j], j], scores.scores[scores.mask[:, j], j])
        for j in range(1, seen["labels"])
        if record.per_label[j]["auroc"] is not None
    ]
    assert record.metrics["macro_auroc"]["point"] == pytest.approx(np.mean(defined))


def test_operating_points_come_from_validation_scores(extracted: Path, tmp_path: Path) -> None:
    from embedkit.eval import youden
    from embedkit.probes import KNNProbe
    from embedkit.probes.features import split_features
    from embedkit.probes.run import find_probe_entry
    from embedkit.store import CacheRoot

    record = run_probe(_probe("knn", ks=(3, 5)), manifest=extracted, results=tmp_path).record
    assert record.operating_point == "youden on validation"
    assert record.requested_resolution == 224 and record.tier == 224
    man = load_manifest(extracted)
    entry = find_probe_entry(CacheRoot.from_uri(man.cache), "demo", "test/tiny-dinov3-vit", 224)
    table = man.dataset("demo").load()
    tr, va, te = (split_features(entry, table, s, "cls") for s in ("train", "val", "test"))
    probe = KNNProbe(k=(3, 5)).fit(tr.X, tr.y, mask=tr.mask)
    k = record.selected["k"]
    val_s, test_s = probe.predict_proba(va.X, k=k), probe.predict_proba(te.X, k=k)
    checked = 0
    for j, row in enumerate(record.per_label):
        if row["threshold"] is None:
            continue
        thr, _, _ = youden(va.y[:, j], val_s[:, j], va.mask[:, j])
        assert row["threshold"] == pytest.approx(thr)
        m = te.mask[:, j]
        called = test_s[m, j] >= thr
        assert row["sensitivity"] == pytest.approx(called[te.y[m, j] == 1].mean())
        checked += 1
    assert checked >= 1


def _variant(manifest: Path, name: str, **dataset: Any) -> Path:
    """The manifest with the demo dataset's entry updated (same images, same cache)."""
    doc = yaml.safe_load(manifest.read_text())
    doc["datasets"]["demo"].update(dataset)
    doc["datasets"]["demo"]["images"] = str(manifest.parent / "images")
    path = manifest.with_name(name)
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def test_a_changed_split_or_target_is_a_new_run_never_the_old_record(
    extracted: Path, tmp_path: Path
) -> None:
    """The record identity covers the exact ids, targets and masks of every split; the
    results-folder guard refuses to mix another test split into one folder."""
    first = run_probe(_probe("knn"), manifest=extracted, results=tmp_path / "a")

    # A train image relabelled in the index (same images, same cache entry): the guard, which
    # compares test splits, lets it into the folder; the record identity makes it a new run.
    table = load_manifest(extracted).dataset("demo").load()
    train_id = table.ids[int(table.indices("train")[0])]
    lines = (extracted.parent / "index.csv").read_text().splitlines()
    for i, line in enumerate(lines):
        cells = line.split(",")
        if cells[0] == train_id:
            cells[3] = "No Finding" if cells[3] != "No Finding" else "Cardiomegaly"
            lines[i] = ",".join(cells)
    changed_index = tmp_path / "index.csv"
    changed_index.write_text("\n".join(lines) + "\n")
    relabelled = _variant(extracted, f"{tmp_path.name}-label.yaml", index=str(changed_index))
    other = run_probe(_probe("knn"), manifest=relabelled, results=tmp_path / "a")
    assert not other.reused and other.path != first.path
    assert other.record.entry["digest"] == first.record.entry["digest"]  # same features

    # Another split: refused in the same folder, a new run (new record id) in another.
    resplit = _variant(
        extracted, f"{tmp_path.name}-seed.yaml",
        splits={"method": "patient", "fractions": {"train": 0.6, "val": 0.2, "test": 0.2},
                "seed": 1},
    )  # fmt: skip
    with pytest.raises(MixedResultsError, match="test split"):
        run_probe(_probe("knn"), manifest=resplit, results=tmp_path / "a")
    third = run_probe(_probe("knn"), manifest=resplit, results=tmp_path / "b")
    assert third.record.record_id not in (first.record.record_id, other.record.record_id)

    again = run_probe(_probe("knn"), manifest=extracted, results=tmp_path / "a")
    assert again.reused and again.path == first.path


def test_tolerance_and_backend_are_part_of_the_record_identity(
    extracted: Path, tmp_path: Path
) -> None:
    default = run_probe(_probe("linear"), manifest=extracted, results=tmp_path)
    strict = run_probe(_probe("linear", tol=1e-12), manifest=extracted, results=tmp_path)
    assert not strict.reused and strict.path != default.path
    assert strict.record.params["tol"] == 1e-12 and default.record.params["backend"] == "torch"
    reference = run_probe(_probe("linear", backend="sklearn"), manifest=extracted, results=tmp_path)
    assert not reference.reused and reference.path != default.path
