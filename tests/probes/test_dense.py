"""The numpy path for small problems (probes/dense.py): the same solutions as the torch solver
and scikit-learn, taken only where it applies; batched few-shot draws equal separate fits."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

import embedkit.probes.dense as dense_module
import embedkit.probes.fewshot as fewshot_module
import embedkit.probes.linear as linear_module
from embedkit.probes import LogisticProbe, run_fewshot
from embedkit.probes.lbfgs import Convergence


def _digits(n: int = 900) -> tuple[np.ndarray, np.ndarray]:
    X, y = load_digits(return_X_y=True)
    return X[:n].astype(np.float32), y[:n]


def _multilabel(y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    Y = np.stack([np.isin(y, [0, 1, 2]), y % 2 == 0, y >= 5], axis=1).astype(np.float32)
    mask = np.random.default_rng(3).random(Y.shape) > 0.15
    return Y, mask


def _spy(monkeypatch: pytest.MonkeyPatch, module: Any = linear_module) -> list[int]:
    """Count the numpy solves ``module`` makes."""
    calls: list[int] = []
    real = dense_module.dense_newton

    def spy(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, "dense_newton", spy)
    return calls


@pytest.mark.parametrize("task", ["multiclass", "multilabel"])
@pytest.mark.parametrize("C", [1e-3, 1e3])
def test_dense_matches_torch_newton_and_sklearn(
    task: str, C: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    X, y = _digits()
    Y, mask = _multilabel(y)
    target, m = (y, None) if task == "multiclass" else (Y, mask)
    calls = _spy(monkeypatch)
    dense = LogisticProbe(C=C, tol=1e-12).fit(X, target, mask=m)
    assert calls, "a 900 x 64 float64 problem takes the numpy path"
    monkeypatch.setattr(linear_module, "DENSE_MAX_VALUES", 0)
    torch_fit = LogisticProbe(C=C, tol=1e-12).fit(X, target, mask=m)
    assert len(calls) == 1
    assert dense.converged_.all() and torch_fit.converged_.all()
    P = dense.predict_proba(X)
    assert np.abs(P - torch_fit.predict_proba(X)).max() < 1e-7
    Xs = StandardScaler().fit_transform(X.astype(np.float64))
    sk = LogisticRegression(C=C, tol=1e-12, max_iter=20_000)
    if task == "multiclass":
        assert np.abs(P - sk.fit(Xs, y).predict_proba(Xs)).max() < 1e-4
    else:
        for j in range(Y.shape[1]):
            ref = sk.fit(Xs[mask[:, j]], Y[mask[:, j], j]).predict_proba(Xs)[:, 1]
            assert np.abs(P[:, j] - ref).max() < 1e-4


def test_dense_path_same_choice_and_iterations_as_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    X, y = _digits(1200)
    args = (X[:1000], y[:1000], None, X[1000:], y[1000:], None)
    Cs = np.logspace(-6, 5, 12)
    dense = LogisticProbe(Cs=Cs).fit_select(*args)
    monkeypatch.setattr(linear_module, "DENSE_MAX_VALUES", 0)
    slow = LogisticProbe(Cs=Cs).fit_select(*args)
    assert dense.C_ == slow.C_
    np.testing.assert_array_equal(dense.path_.n_iter, slow.path_.n_iter)  # same method
    assert np.abs(dense.predict_proba(X) - slow.predict_proba(X)).max() < 1e-5


@pytest.mark.parametrize(
    "kw",
    [{"dtype": "float32"}, {"solver": "lbfgs"}, {"backend": "sklearn"}],
    ids=["float32", "lbfgs", "sklearn"],
)
def test_dense_path_not_taken_outside_its_scope(
    kw: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    X, y = _digits(300)
    calls = _spy(monkeypatch)
    LogisticProbe(C=1.0, **kw).fit(X, y)
    assert not calls
    monkeypatch.setattr(linear_module, "DENSE_MAX_VALUES", 300 * 65 - 1)  # just too many values
    LogisticProbe(C=1.0).fit(X, y)
    assert not calls


@pytest.mark.parametrize("task", ["multiclass", "multilabel"])
def test_batched_fewshot_draws_equal_separate_fits(
    task: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    X, y = _digits(1000)
    Y, mask = _multilabel(y)
    tr, te = slice(0, 800), slice(800, 1000)
    target, m_tr, m_te = (
        (y, None, None) if task == "multiclass" else (Y, mask[tr], mask[te])
    )  # fmt: skip
    groups = np.arange(800) // 2
    kw: dict[str, Any] = {"shots": (1, 4), "seeds": range(3)}
    seen: list[tuple[int, str]] = []

    def factory(total: int, description: str) -> Any:
        from contextlib import contextmanager

        @contextmanager
        def bar() -> Any:
            seen.append((total, description))
            yield lambda n: seen.append((n, "advance"))

        return bar()

    batches = _spy(monkeypatch, fewshot_module)
    together = run_fewshot(
        X[tr], target[tr], m_tr, groups, X[te], target[te], m_te, progress=factory, **kw
    )
    assert len(batches) == 2  # one batched solve per shot count
    assert seen[0] == (6, "few-shot draws") and sum(n for n, what in seen[1:]) == 6
    monkeypatch.setattr(fewshot_module, "DENSE_MAX_VALUES", 0)  # one LogisticProbe per draw
    apart = run_fewshot(X[tr], target[tr], m_tr, groups, X[te], target[te], m_te, **kw)
    assert together.runs.keys() == apart.runs.keys()
    for key, metrics in together.runs.items():
        for name, value in metrics.items():
            assert abs(value - apart.runs[key][name]) <= 1e-4, (key, name)


def test_convergence_bookkeeping_same_on_numpy_and_torch() -> None:
    for lib in ("numpy", "torch"):
        arr = np.asarray if lib == "numpy" else torch.as_tensor
        state = Convergence(arr([True, True, True, False]))
        assert not state.gradient_small(arr([1e-9, 1.0, 1.0, 0.0]), 1e-6)
        f = arr([0.0, 2.0, 3.0, 0.0])
        state.after_step(f, arr([0.0, 1.0, 3.0, 0.0]), arr([False, False, True, False]), 1e-12)
        assert state.active.tolist() == [False, True, False, False]
        info = state.info()
        assert info.converged.tolist() == [True, False, True, True]
        assert info.n_iter.tolist() == [0, 1, 1, 0]
