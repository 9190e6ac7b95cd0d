"""Result records: JSON + Parquet round trip, refusal to overwrite, stable ids."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from embedkit.errors import EntryExistsError
from embedkit.results import ResultRecord, ResultsDir, ScoreTable, load_scores, record_id


def _record(rid: str) -> ResultRecord:
    return ResultRecord(
        record_id=rid,
        kind="linear",
        dataset="demo",
        model="test/tiny-dinov3-vit",
        resolution=224,
        pooling="cls+mean",
        task="multilabel",
        labels=["A", "B"],
        entry={"digest": "ab" * 32},
        params={"Cs": [0.1, 1.0]},
        selected={"C": 1.0},
        seed=0,
        metrics={"macro_auroc": {"point": 0.7, "low": 0.6, "high": 0.8}},
        per_label=[{"label": "A", "auroc": 0.7}],
        n={"train": 10, "val": 2, "test": 3},
        versions={"embedkit": "0"},
        elapsed_s=1.0,
        created_at="2026-01-01T00:00:00+00:00",
    )


def test_record_id_is_stable_and_order_independent() -> None:
    assert record_id({"a": 1, "b": [1, 2]}) == record_id({"b": [1, 2], "a": 1})
    assert record_id({"a": 1}) != record_id({"a": 2})
    assert len(record_id({"a": 1})) == 16


@pytest.mark.parametrize("multiclass", [False, True])
def test_write_and_load_round_trip(tmp_path: Path, multiclass: bool) -> None:
    rng = np.random.default_rng(0)
    if multiclass:
        y, mask = rng.integers(0, 2, 3), np.array([True, True, False])
    else:
        y, mask = rng.integers(0, 2, (3, 2)).astype(np.float32), rng.random((3, 2)) > 0.3
    scores = ScoreTable(("i1", "i2", "i3"), ("A", "B"), y, mask, rng.random((3, 2)))
    results = ResultsDir(tmp_path)
    path = results.write(_record("0123456789abcdef"), scores)
    assert path.name == "linear-0123456789abcdef.json"
    back = load_scores(path)
    assert back.ids == scores.ids
    np.testing.assert_array_equal(back.y, y)
    np.testing.assert_array_equal(back.mask, mask)
    np.testing.assert_array_equal(back.scores, scores.scores)
    assert results.find(_record("0123456789abcdef").relpath()) is not None
    with pytest.raises(EntryExistsError, match="--overwrite"):
        results.write(_record("0123456789abcdef"), scores)
    results.write(_record("0123456789abcdef"), scores, overwrite=True)
    assert len(results.records()) == 1
