"""End to end: phantom CT volumes -> `embedkit extract` (tiny model, one row per slice) ->
volume-level linear probes on slice features pooled by mean and by max."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from embedkit.cli import app
from embedkit.data.phantoms import write_phantom_dataset
from embedkit.manifest import DatasetTable, load_manifest
from embedkit.probes.features import SplitFeatures, pool_volumes, split_features
from embedkit.probes.request import VolumePooling
from embedkit.probes.run import find_probe_entry
from embedkit.store import CacheRoot, FeatureEntry

from ..conftest import cli_env

runner = CliRunner()
SLICES = 6


@pytest.fixture(scope="module")
def extracted(tmp_path_factory: pytest.TempPathFactory, model_cache: Path) -> Path:
    manifest = write_phantom_dataset(
        tmp_path_factory.mktemp("phantom-e2e"), n_volumes=12, shape=(48, 40, SLICES)
    )
    args = [
        "extract", "--model", "test/tiny-dinov2", "--dataset", "phantom-ct",
        "--resolution", "56", "--batch-size", "8", "--unit-rows", "16", "--workers", "0",
        "--device", "cpu", "--manifest", str(manifest),
    ]  # fmt: skip
    result = runner.invoke(app, args, env=cli_env(model_cache))
    assert result.exit_code == 0, result.output
    return manifest


def _entry(manifest: Path) -> FeatureEntry:
    root = CacheRoot.from_uri(load_manifest(manifest).cache)
    return find_probe_entry(root, "phantom-ct", "test/tiny-dinov2", 56, None)


def test_extract_stores_one_row_per_slice(extracted: Path) -> None:
    entry = _entry(extracted)
    table = load_manifest(extracted).dataset("phantom-ct").load()
    assert entry.key.n_images == 12 * SLICES == len(table)
    assert entry.ids[:2] == ("ct000/0", "ct000/1")
    # The window is part of the key: another window is another entry.
    assert '"window":{"level":50.0,"width":400.0}' in entry.key.preprocessing
    assert entry.valid_mask().all()


@pytest.mark.parametrize("how", ["mean", "max"])
def test_volume_features_pool_the_slices(extracted: Path, how: VolumePooling) -> None:
    entry = _entry(extracted)
    table = load_manifest(extracted).dataset("phantom-ct").load()
    part = split_features(entry, table, "test", "cls", how)
    assert part.ids == ("ct008", "ct009", "ct010", "ct011")
    slices = entry.read("cls").astype(np.float32)
    for i, volume in enumerate(part.ids):
        rows = [r for r, v in enumerate(table.volumes or ()) if v == volume]
        expected = slices[rows].mean(axis=0) if how == "mean" else slices[rows].max(axis=0)
        np.testing.assert_allclose(part.X[i], expected, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(part.y, [[0, 0], [1, 0], [0, 1], [1, 1]])
    assert part.patients == ("p008", "p009", "p010", "p011")
    # Pooling in blocks of whole volumes (here one volume per block) gives the same rows.
    blocked = pool_volumes(_slices(entry, table, "test"), table, how, block_rows=2)
    np.testing.assert_array_equal(blocked.X, part.X)


def _slices(entry: FeatureEntry, table: DatasetTable, split: str) -> SplitFeatures:
    rows = table.indices(split)
    ids = tuple(table.ids[r] for r in rows)
    return SplitFeatures(
        split, "cls", entry.read("cls", ids=list(ids)), ids, table.labels.y[rows],
        table.labels.mask[rows], tuple(table.patients[r] for r in rows), 0,
    )  # fmt: skip


def test_probe_with_mean_and_max_pooling_records_the_choice(
    extracted: Path, model_cache: Path, tmp_path: Path
) -> None:
    records: dict[str, str] = {}
    for how in ("mean", "max"):
        args = [
            "probe", "--kind", "linear", "--model", "test/tiny-dinov2", "--dataset",
            "phantom-ct", "--resolution", "56", "--pooling", "cls", "--n-boot", "50",
            "--volume-pooling", how, "--out", str(tmp_path / "results"),
            "--manifest", str(extracted),
        ]  # fmt: skip
        result = runner.invoke(app, args, env=cli_env(model_cache))
        assert result.exit_code == 0, result.output
        (path,) = [
            p for p in (tmp_path / "results").rglob("*.json") if p.name not in records.values()
        ]
        records[how] = path.name
        record = json.loads(path.read_text())
        assert record["params"]["volume_pooling"] == how
        assert record["n"] == {"train": 4, "val": 4, "test": 4}  # volumes, not slices
        assert record["labels"] == ["liver_enlarged", "has_lesion"]
        assert "auroc" in json.dumps(record["metrics"]).lower()
    assert records["mean"] != records["max"]  # the pooling is part of the record identity
