"""No probe runs on non-finite data: every estimator, and the runner naming the image ids."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from embedkit.errors import ProbeInputError
from embedkit.extract import ExtractionRequest, extract
from embedkit.manifest import load_manifest
from embedkit.probes import KNNProbe, LogisticProbe, SGDLinearProbe, run_fewshot
from embedkit.probes.features import split_features
from embedkit.store import FeatureEntry


def _data(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = (rng.random((60, 3)) < 0.4).astype(np.float32)
    X = (y @ rng.normal(size=(3, 8)) + rng.normal(size=(60, 8))).astype(np.float32)
    return X, y, np.ones(y.shape, bool)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize(
    "make",
    [
        lambda: LogisticProbe(C=1.0, max_iter=50),
        lambda: KNNProbe(k=5),
        lambda: SGDLinearProbe(epochs=2),
    ],
    ids=["LogisticProbe", "KNNProbe", "SGDLinearProbe"],
)
def test_estimators_refuse_non_finite_features_naming_the_rows(make: object, bad: float) -> None:
    X, y, mask = _data()
    X[17, 3] = bad
    with pytest.raises(ProbeInputError, match=r"NaN or Inf values in 1 of 60 rows \(rows 17\)"):
        make().fit(X, y, mask=mask)  # type: ignore[operator]


def test_estimators_refuse_non_finite_queries() -> None:
    X, y, mask = _data()
    probe = KNNProbe(k=5).fit(X, y, mask=mask)
    query = X[:4].copy()
    query[2, 0] = np.nan
    with pytest.raises(ProbeInputError, match="rows 2"):
        probe.predict_proba(query)


def test_nan_targets_are_refused_with_the_mask_as_the_fix() -> None:
    X, y, mask = _data()
    y[5, 1] = np.nan
    with pytest.raises(ProbeInputError, match="mask"):
        LogisticProbe(C=1.0, max_iter=50).fit(X, y, mask=mask)


def test_fewshot_refuses_non_finite_features() -> None:
    X, y, mask = _data()
    X[3] = np.nan
    groups = np.arange(60)
    with pytest.raises(ProbeInputError, match="NaN or Inf"):
        run_fewshot(X, y, mask, groups, X, y, mask, shots=(1,), seeds=range(1))


def test_split_features_names_the_images_whose_features_are_not_finite(
    demo_manifest: Path, model_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A NaN that reaches the probe runner (e.g. read with verify=False) stops it with ids."""
    request = ExtractionRequest(
        model="test/tiny-dinov3-vit", dataset="demo", resolution=64, num_workers=0, unit_rows=8
    )
    entry = extract(request, manifest=demo_manifest, model_cache_dir=model_cache).entry
    table = load_manifest(demo_manifest).dataset("demo").load()
    train = split_features(entry, table, "train", "cls")
    real_read = FeatureEntry.read

    def read_with_a_nan(self: FeatureEntry, *args: object, **kwargs: object) -> np.ndarray:
        X = np.array(real_read(self, *args, **kwargs))  # type: ignore[arg-type]
        ids = kwargs.get("ids")
        if isinstance(ids, list | tuple) and train.ids[1] in ids:
            X[list(ids).index(train.ids[1]), 0] = np.nan
        return X

    monkeypatch.setattr(FeatureEntry, "read", read_with_a_nan)
    with pytest.raises(ProbeInputError, match=train.ids[1]) as info:
        split_features(entry, table, "train", "cls")
    assert "cache verify" in str(info.value)
