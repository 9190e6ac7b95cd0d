"""Progress of long probe steps: the C path, kNN query blocks, bootstrap resamples (few-shot draws:
tests/probes/test_dense.py), and the runner passing its factory down to the kinds."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from sklearn.datasets import load_digits

from embedkit.eval.bootstrap import bootstrap_ci, bootstrap_indices
from embedkit.extract import ExtractionRequest, extract
from embedkit.probes import KNNProbe, LogisticProbe
from embedkit.probes.run import ProbeRequest, run_probe
from embedkit.progress import current_progress, no_progress, progress_scope


class Recorder:
    """A progress factory that records each bar's total, description and advances."""

    def __init__(self) -> None:
        self.bars: list[tuple[str, int, list[int]]] = []

    @contextmanager
    def __call__(self, total: int, description: str) -> Iterator[Callable[[int], None]]:
        steps: list[int] = []
        self.bars.append((description, total, steps))
        yield steps.append

    def totals(self) -> dict[str, tuple[int, int]]:
        """description -> (total, sum of advances) of the last bar of that description."""
        return {d: (t, sum(s)) for d, t, s in self.bars}


def test_linear_c_path_advances_once_per_c() -> None:
    X, y = load_digits(return_X_y=True)
    rec = Recorder()
    Cs = np.logspace(-4, 2, 7)
    LogisticProbe(Cs=Cs, progress=rec).fit_select(X[:300], y[:300], None, X[300:400], y[300:400],
                                                  None)  # fmt: skip
    assert rec.bars == [("linear probe: C path", 7, [1] * 7)]


def test_knn_advances_by_query_block() -> None:
    X, y = load_digits(return_X_y=True)
    rec = Recorder()
    probe = KNNProbe(k=(5, 10), block_size=50, progress=rec).fit(X[:500], y[:500])
    probe.predict_proba_per_k(X[500:620])
    probe.kneighbors(X[:30])
    assert [(d, t, s) for d, t, s in rec.bars] == [
        ("kNN search (queries)", 120, [50, 50, 20]),
        ("kNN search (queries)", 30, [30]),
    ]


@pytest.mark.parametrize("metric", ["macro_auroc", "accuracy"])
def test_bootstrap_advances_per_resample(metric: str) -> None:
    rng = np.random.default_rng(0)
    if metric == "accuracy":
        y, scores = rng.integers(0, 3, 80), rng.random((80, 3))
    else:
        y, scores = (rng.random((80, 2)) < 0.5).astype(float), rng.random((80, 2))
    idx = bootstrap_indices(80, n_boot=150)
    rec = Recorder()
    with_bar = bootstrap_ci(y, None, scores, metric, idx, progress=rec)
    assert rec.totals() == {f"bootstrap {metric} (resamples)": (150, 150)}
    assert bootstrap_ci(y, None, scores, metric, idx) == with_bar
    # Inside a runner's scope only work above BAR_MIN_VALUES shows a bar: none here.
    with progress_scope(rec):
        bootstrap_ci(y, None, scores, metric, idx)
    assert len(rec.bars) == 1


def test_progress_scope_sets_and_restores_the_factory() -> None:
    rec = Recorder()
    assert current_progress() is no_progress
    with progress_scope(rec):
        assert current_progress() is rec
        with progress_scope(None):
            assert current_progress() is no_progress
        assert current_progress() is rec
    assert current_progress() is no_progress


@pytest.mark.parametrize("kind", ["linear", "knn"])
def test_run_probe_passes_its_progress_to_the_kind(
    kind: str, demo_manifest: Path, model_cache: Path, tmp_path: Path
) -> None:
    extract(
        ExtractionRequest(
            model="test/tiny-dinov3-vit", dataset="demo", resolution=224, num_workers=0,
            unit_rows=8,
        ),
        manifest=demo_manifest, model_cache_dir=model_cache,
    )  # fmt: skip
    request = ProbeRequest(
        kind=kind, model="test/tiny-dinov3-vit", dataset="demo", resolution=224, max_iter=100,
        n_boot=50,
    )  # fmt: skip
    rec = Recorder()
    outcome = run_probe(request, manifest=demo_manifest, results=tmp_path, progress=rec)
    if kind == "linear":
        assert rec.totals() == {"linear probe: C path": (45, 45)}
    else:  # validation per k, test, validation at the chosen k
        n_val, n_test = outcome.record.n["val"], outcome.record.n["test"]
        assert [(d, t, sum(s)) for d, t, s in rec.bars] == [
            ("kNN search (queries)", n, n) for n in (n_val, n_test, n_val)
        ]


def test_fewshot_kind_one_bar_over_all_draws_skipped_ones_included() -> None:
    from embedkit.probes import get_kind
    from embedkit.probes.features import SplitFeatures
    from embedkit.probes.registry import ProbeData

    rng = np.random.default_rng(0)

    def part(name: str, n: int) -> SplitFeatures:
        y = (rng.random((n, 2)) < 0.4).astype(np.float32)
        X = (rng.normal(size=(n, 8)) + 2 * y[:, :1]).astype(np.float16)
        patients = tuple(f"{name}{i // 2}" for i in range(n))
        ids = tuple(f"{name}-{i}" for i in range(n))
        return SplitFeatures(name, "cls+mean", X, ids, y, np.ones_like(y, bool), patients, 0)

    data = ProbeData(part("train", 80), part("val", 0), part("test", 30), ("A", "B"),
                     "multilabel", "toy")  # fmt: skip
    request = ProbeRequest(kind="fewshot", model="test/tiny-dinov3-vit", dataset="toy",
                           resolution=224, shots=(1, 2, 64), draws=3)  # fmt: skip
    rec = Recorder()
    with progress_scope(rec):
        get_kind("fewshot").fit_score(request, data)
    assert rec.bars == [("few-shot draws", 9, [1, 1, 1, 1, 1, 1, 3])]
