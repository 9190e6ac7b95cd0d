"""Preconditioner of the logistic probes: the spectrum of the features' second-moment matrix.

L-BFGS on embeddings (decaying spectrum) needs hundreds of iterations per C unless its initial
inverse Hessian knows the spectrum. The Hessian of the scaled L2-logistic loss of one label is
close to ``M = a E[x x^T] + I / (C n)`` (``a`` the mean logistic curvature), so the solver
applies ``M^-1`` from the eigenpairs ``(s, V)`` of ``E[x x^T]`` of the standardised features:

- up to ``exact_max`` features (2,048): the exact D x D matrix from at most 32,768 strided
  rows, in float64, eigendecomposed once (:func:`estimate_spectrum`);
- above that, a rank-``rank`` (1,024) randomized eigendecomposition from 16,384 strided rows
  (Halko, Martinsson & Tropp 2011: a Gaussian sketch, ``power_iters`` power iterations,
  Rayleigh-Ritz), streamed over the sampled rows in float32 blocks, so neither a D x D matrix
  nor a copy of the sample is ever formed;
  the complement of ``V`` is given the smallest kept eigenvalue (``tail``), as in randomized
  Nyström preconditioning (Frangella, Tropp & Udell 2023).

The preconditioner changes only how fast L-BFGS converges: the objective, its gradient, the
stopping rule and the optimum are those of the unpreconditioned problem.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from embedkit.probes.backends import RowBlocks

__all__ = ["EXACT_MAX_FEATURES", "Spectrum", "apply_inverse", "estimate_spectrum"]

#: Rows (evenly strided) used to estimate the second-moment matrix (exact / low-rank).
SAMPLE_ROWS = 32768
LOW_RANK_SAMPLE_ROWS = 16384
#: Up to this many features the D x D matrix is formed and eigendecomposed exactly.
EXACT_MAX_FEATURES = 2048
#: Rank, oversampling and power iterations of the randomized estimate above that.
LOW_RANK = 1024
OVERSAMPLE = 32
POWER_ITERS = 1


@dataclass(frozen=True)
class Spectrum:
    """Eigenpairs of ``E[x x^T]``: ``vectors`` ``(D, k)`` orthonormal, ``values`` ``(k,)``; on
    the orthogonal complement of ``vectors`` the eigenvalue ``tail`` is assumed (None when
    ``vectors`` span the whole space)."""

    values: torch.Tensor
    vectors: torch.Tensor
    tail: float | None

    @property
    def rank(self) -> int:
        return int(self.values.shape[0])


def _standardised(
    blocks: RowBlocks,
    max_rows: int,
    mean: torch.Tensor | None,
    inv_scale: torch.Tensor | None,
    dtype: torch.dtype,
) -> Iterator[torch.Tensor]:
    m = None if mean is None else mean.to(dtype)
    inv = None if inv_scale is None else inv_scale.to(dtype)
    for Xb in blocks.strided(max_rows, dtype):  # a fresh copy of the sampled rows: in place
        if m is not None:
            Xb.sub_(m)
        if inv is not None:
            Xb.mul_(inv)
        yield Xb


def _times_second_moment(
    blocks: RowBlocks,
    max_rows: int,
    mean: torch.Tensor | None,
    inv_scale: torch.Tensor | None,
    Q: torch.Tensor,
) -> torch.Tensor:
    """``E[x x^T] Q`` over the sampled rows, one streamed pass in ``Q``'s dtype."""
    out = torch.zeros_like(Q)
    count = 0
    for Xb in _standardised(blocks, max_rows, mean, inv_scale, Q.dtype):
        out.addmm_(Xb.T, Xb @ Q)
        count += Xb.shape[0]
    return out / max(count, 1)


def estimate_spectrum(
    blocks: RowBlocks,
    mean: torch.Tensor | None,
    inv_scale: torch.Tensor | None,
    *,
    exact_max: int = EXACT_MAX_FEATURES,
    rank: int = LOW_RANK,
    oversample: int = OVERSAMPLE,
    power_iters: int = POWER_ITERS,
    seed: int = 0,
) -> Spectrum:
    """Eigenpairs of the second-moment matrix of the standardised rows ``(x - mean) * inv_scale``
    (in the compute dtype of ``blocks``): exact up to ``exact_max`` features, else of rank
    ``rank``, randomized with a fixed ``seed``. Memory: D x D float64 when exact, a few
    D x (rank + oversample) matrices otherwise, plus one converted block of sampled rows."""
    D, dt, dev = blocks.n_features, blocks.dtype, blocks.device
    if max(exact_max, rank + oversample) >= D:
        max_rows = SAMPLE_ROWS
        A = torch.zeros((D, D), dtype=torch.float64, device=dev)
        count = 0
        for Xb in _standardised(blocks, max_rows, mean, inv_scale, torch.float64):
            A.addmm_(Xb.T, Xb)
            count += Xb.shape[0]
        s, V = torch.linalg.eigh(A / max(count, 1))
        return Spectrum(s.clamp_min(0.0).to(dt), V.to(dt), None)
    max_rows = LOW_RANK_SAMPLE_ROWS
    gen = torch.Generator(device=dev).manual_seed(seed)
    m = rank + oversample
    Q = torch.randn((D, m), generator=gen, dtype=torch.float32, device=dev)
    for _ in range(power_iters + 1):
        Q = torch.linalg.qr(Q).Q
        Q = _times_second_moment(blocks, max_rows, mean, inv_scale, Q)
    # Q now holds A Q0 for an orthonormal Q0; Rayleigh-Ritz on span(A Q0) needs one more pass.
    basis = torch.linalg.qr(Q).Q
    del Q
    B = (basis.T @ _times_second_moment(blocks, max_rows, mean, inv_scale, basis)).double()
    s, U = torch.linalg.eigh(0.5 * (B + B.T))
    s, U = s.flip(0)[:rank].clamp_min(0.0), U.flip(1)[:, :rank]
    # Orthonormal to float64 precision: M^-1 stays positive definite even when 1 / lam is huge.
    V = torch.linalg.qr(basis.double() @ U).Q
    return Spectrum(s.to(dt), V.to(dt), float(s[-1]))


def apply_inverse(
    spectrum: Spectrum, Q: torch.Tensor, curv: torch.Tensor, lam: torch.Tensor
) -> torch.Tensor:
    """``M^-1 Q`` for ``Q`` ``(D + 1, m)`` (weights, then the intercept row), where per column
    ``M = a E[x x^T] + lam I`` on the weights and ``a`` on the intercept, ``a = curv``."""
    s, V = spectrum.values, spectrum.vectors
    a = curv.clamp_min(1e-6)
    out = torch.empty_like(Q)
    U = V.T @ Q[:-1]
    scaled = U / (s[:, None] * a[None, :] + lam[None, :])
    if spectrum.tail is None:
        torch.matmul(V, scaled, out=out[:-1])
    else:  # complement of span(V): eigenvalue ``tail``
        rest = (Q[:-1] - V @ U) / (spectrum.tail * a + lam)[None, :]
        out[:-1] = V @ scaled + rest
    out[-1] = Q[-1] / a
    return out
