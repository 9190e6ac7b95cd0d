"""The preconditioner's spectrum: exact below the threshold, randomized low-rank above it."""

from __future__ import annotations

import numpy as np
import torch

from embedkit.probes.backends import RowBlocks, Source
from embedkit.probes.precondition import apply_inverse, estimate_spectrum


def _features(n: int, d: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    basis = np.linalg.qr(rng.normal(size=(d, d)))[0]
    return ((rng.normal(size=(n, d)) * np.arange(1, d + 1) ** -0.8) @ basis.T + 1.0).astype(
        np.float16
    )


def _blocks(X: np.ndarray) -> RowBlocks:
    return RowBlocks([Source(X)], dtype=torch.float64, device=torch.device("cpu"), block_rows=97)


def _stats(X: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    X64 = X.astype(np.float64)
    mean, std = X64.mean(0), X64.std(0)
    Xs = (X64 - mean) / std
    return torch.tensor(mean), torch.tensor(1.0 / std), Xs.T @ Xs / X.shape[0]


def test_exact_spectrum_is_the_second_moment_of_standardised_rows() -> None:
    X = _features(500, 40)
    mean, inv, A = _stats(X)
    spec = estimate_spectrum(_blocks(X), mean, inv)
    assert spec.tail is None and spec.rank == 40
    rebuilt = (spec.vectors * spec.values) @ spec.vectors.T
    np.testing.assert_allclose(rebuilt.numpy(), A, atol=1e-10)


def test_randomized_top_eigenvalues_match_the_exact_ones() -> None:
    X = _features(3000, 300, seed=1)
    mean, inv, A = _stats(X)
    spec = estimate_spectrum(_blocks(X), mean, inv, exact_max=0, rank=60, oversample=20)
    exact = np.linalg.eigvalsh(A)[::-1]
    assert spec.rank == 60 and spec.tail is not None
    np.testing.assert_allclose(spec.values[:20].numpy(), exact[:20], rtol=1e-2)
    V = spec.vectors.numpy()
    np.testing.assert_allclose(V.T @ V, np.eye(60), atol=1e-10)
    assert spec.tail == float(spec.values[-1])


def test_low_rank_inverse_is_exact_when_the_rank_covers_the_data() -> None:
    # 80 rows in 200 dimensions: the second moment has rank <= 79, so a rank-100 sketch holds
    # all of it and M^-1 (weights and intercept) must equal the dense inverse (up to the float32
    # precision of the sketch).
    X = _features(80, 200, seed=2)
    mean, inv, A = _stats(X)
    spec = estimate_spectrum(_blocks(X), mean, inv, exact_max=0, rank=100, oversample=10)
    a, lam = torch.tensor([0.2, 0.05]), torch.tensor([1e-3, 0.5])
    Q = torch.randn(201, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    got = apply_inverse(spec, Q, a, lam).numpy()
    for j in range(2):
        M = float(a[j]) * A + float(lam[j]) * np.eye(200)
        ref = np.linalg.solve(M, Q[:-1, j].numpy())
        np.testing.assert_allclose(got[:-1, j], ref, rtol=0, atol=1e-5 * np.abs(ref).max())
        assert np.isclose(got[-1, j], float(Q[-1, j]) / float(a[j]))
