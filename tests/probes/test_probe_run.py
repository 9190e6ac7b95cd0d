"""`run_probe`: cached features ─► probe ─► metrics with CIs ─► a reusable result record."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from embedkit.errors import CacheNotFoundError, EmbedkitError
from embedkit.extract import ExtractionRequest, extract
from embedkit.manifest import load_manifest
from embedkit.probes.run import ProbeRequest, run_probe
from embedkit.results import load_scores


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
    assert (local / summary.relpath / "COMPLETE.json").is_file()  # a verified local copy

    def record(out: str) -> dict[str, object]:
        (path,) = (tmp_path / out).rglob("knn-*.json")
        return dict(json.loads(path.read_text()))

    assert record("rt")["metrics"] == record("direct")["metrics"]
    assert record("rt")["entry"] == record("direct")["entry"]  # names the shared entry

    # Warm: the shared entry's chunk objects are gone, the probe still runs from the local
    # copy (here found through EMBEDKIT_LOCAL_CACHE).
    chunks = [
        p for p in shared.files(summary.relpath) if re.search(r"/c[./]\d", p) and p[:4] != "ids/"
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
