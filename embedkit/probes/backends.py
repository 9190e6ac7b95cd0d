"""Where probe arithmetic happens: row blocks of (possibly huge) feature matrices, and backends.

Feature matrices arrive as numpy float16 / float32 ``(N, D)`` and may be far larger than memory
allows in float32 (814k x 8192 float16 = 13 GB). Nothing here makes a float32 copy of a whole
matrix: :class:`RowBlocks` hands out row blocks converted to the compute dtype (about 64 MB
each), and keeps them resident only while their converted total stays under
``max_resident_bytes`` (256 MiB by default, so only small matrices are cached); above that,
blocks are re-read from the source on every pass. Standardisation is never applied to the
features: :func:`fold_standardization` moves it into the weights. :func:`column_stats` computes
the standardisation mean / std by blocks in float64 (Chan et al.'s pairwise update).

The GPU path is torch on CUDA (``device="cuda"``); see the probes' ``device`` argument.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray

from embedkit.errors import ProbeInputError

__all__ = [
    "DEFAULT_BLOCK_CACHE_BYTES",
    "DEFAULT_MAX_RESIDENT_BYTES",
    "ProbeInputError",
    "RowBlocks",
    "Source",
    "block_rows_for",
    "check_features",
    "column_stats",
    "compute_threads",
    "fold_standardization",
    "safe_scale",
    "stat_tensors",
    "torch_dtype",
]

#: kNN: train features kept resident (float32) up to this size.
DEFAULT_MAX_RESIDENT_BYTES = 2**30
#: Iterative solvers: converted row blocks cached between passes up to this size.
DEFAULT_BLOCK_CACHE_BYTES = 2**28
_BLOCK_BYTES = 2**26  # ~64 MB per converted block
#: Up to this many feature values (rows x dims) a probe computes on one CPU thread.
SINGLE_THREAD_MAX_ELEMENTS = 2**22


@contextmanager
def compute_threads(n_threads: int | None, n_elements: int) -> Iterator[int]:
    """Run the block inside with ``n_threads`` torch CPU threads (restored afterwards).

    None: one thread for small problems (up to :data:`SINGLE_THREAD_MAX_ELEMENTS` feature
    values), where each pass over the rows is too short to split and a multi-threaded loop
    collapses on a busy shared node, and torch's own setting above.
    """
    if n_threads is not None and n_threads < 1:
        raise ProbeInputError(f"Expected n_threads >= 1 or None, got {n_threads}.")
    old = torch.get_num_threads()
    n = n_threads or (1 if n_elements <= SINGLE_THREAD_MAX_ELEMENTS else old)
    torch.set_num_threads(n)
    try:
        yield n
    finally:
        torch.set_num_threads(old)


@dataclass(frozen=True)
class Source:
    """Rows ``array[rows]`` (all rows when ``rows`` is None) of one feature matrix, not copied."""

    array: NDArray[Any]
    rows: NDArray[np.int64] | None = None

    @property
    def n_rows(self) -> int:
        return int(self.array.shape[0] if self.rows is None else self.rows.shape[0])

    def read(self, start: int, stop: int) -> NDArray[Any]:
        if self.rows is None:
            return np.asarray(self.array[start:stop])
        return np.asarray(self.array[self.rows[start:stop]])

    def read_rows(self, local: NDArray[np.int64]) -> NDArray[Any]:
        """Rows at positions ``local`` (sorted) of this source."""
        return np.asarray(self.array[local if self.rows is None else self.rows[local]])


def check_features(X: Any, name: str = "X") -> NDArray[Any]:
    """Accept a 2-D float16/float32/float64 array (memory maps included) without copying."""
    arr = X if isinstance(X, np.ndarray) else np.asarray(X)
    if arr.ndim != 2:
        raise ProbeInputError(
            f"Expected {name} of shape (N, D), got {arr.shape} instead. Reshape your data "
            "(one row per image: X[None, :] for a single image)."
        )
    if arr.dtype not in (np.float16, np.float32, np.float64):
        raise ProbeInputError(
            f"Expected {name} as float16, float32 or float64, got {arr.dtype} instead."
        )
    return arr


def block_rows_for(n_features: int, itemsize: int) -> int:
    """Rows per block so that one converted block takes about 64 MB."""
    return max(64, _BLOCK_BYTES // max(1, n_features * itemsize))


def column_stats(
    sources: Sequence[Source], block_rows: int | None = None
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Column mean and population std (ddof 0, as ``StandardScaler``) over all rows, by blocks.

    Each block is converted to float64 and merged with Chan et al.'s update, so float16 input is
    never copied whole; the result does not depend on the block size beyond rounding.
    """
    n_features = int(sources[0].array.shape[1])
    rows = block_rows or block_rows_for(n_features, 8)
    count = 0
    mean = np.zeros(n_features)
    m2 = np.zeros(n_features)
    for src in sources:
        for start in range(0, src.n_rows, rows):
            block = src.read(start, min(start + rows, src.n_rows)).astype(np.float64)
            nb = block.shape[0]
            bmean = block.mean(axis=0)
            block -= bmean  # in place: one float64 block is the only temporary
            bm2 = np.einsum("ij,ij->j", block, block)
            delta = bmean - mean
            total = count + nb
            mean = mean + delta * (nb / total)
            m2 = m2 + bm2 + delta**2 * (count * nb / total)
            count = total
    if count == 0:
        raise ProbeInputError("Expected at least one row of features, got none.")
    return mean, np.sqrt(m2 / count)


def safe_scale(std: NDArray[np.float64]) -> NDArray[np.float64]:
    """Std with zeros replaced by 1 (constant features stay constant), as ``StandardScaler``."""
    return np.where(std > 0, std, 1.0)


def stat_tensors(
    mean: NDArray[np.float64] | None,
    scale: NDArray[np.float64] | None,
    dtype: torch.dtype,
    device: torch.device,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(mean, 1 / scale)`` as tensors of the compute dtype (None where not standardising)."""
    m = None if mean is None else torch.as_tensor(mean, dtype=dtype, device=device)
    inv = None if scale is None else torch.as_tensor(1.0 / scale, dtype=dtype, device=device)
    return m, inv


def fold_standardization(
    W: torch.Tensor, mean: torch.Tensor | None, inv_scale: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights ``(D, Q)`` and intercepts ``(Q,)`` on the raw features of the standardised-space
    weights ``W`` ``(D + 1, Q)``: ``((x - mean) * inv_scale) @ w + b = x @ w' + b'``."""
    w, b = W[:-1], W[-1]
    if inv_scale is not None:
        w = w * inv_scale[:, None]
    if mean is not None:
        b = b - mean @ w
    return w, b


class RowBlocks:
    """Row blocks of one or more sources as ``(start, stop, tensor)`` in the compute dtype.

    Blocks are cached when the converted total fits in ``max_resident_bytes`` (a converted copy
    is then kept, which makes the many passes of an iterative solver faster on small matrices);
    otherwise they are converted afresh on every pass and only one block is alive at a time.
    """

    def __init__(
        self,
        sources: Sequence[Source],
        *,
        dtype: torch.dtype,
        device: torch.device,
        block_rows: int | None = None,
        max_resident_bytes: int = DEFAULT_BLOCK_CACHE_BYTES,
    ) -> None:
        self.sources = list(sources)
        self.n_features = int(self.sources[0].array.shape[1])
        self.n_rows = sum(s.n_rows for s in self.sources)
        self.dtype = dtype
        self.device = device
        itemsize = torch.empty((), dtype=dtype).element_size()
        self.block_rows = block_rows or block_rows_for(self.n_features, itemsize)
        self._resident = self.n_rows * self.n_features * itemsize <= max_resident_bytes
        self._cache: list[tuple[int, int, torch.Tensor]] | None = None

    def convert(self, block: NDArray[Any], dtype: torch.dtype | None = None) -> torch.Tensor:
        """One block as a tensor of the compute dtype (or ``dtype``) on the device."""
        t = torch.from_numpy(np.ascontiguousarray(block))
        return t.to(device=self.device, dtype=dtype or self.dtype)

    def _generate(self) -> Iterator[tuple[int, int, torch.Tensor]]:
        offset = 0
        for src in self.sources:
            for start in range(0, src.n_rows, self.block_rows):
                stop = min(start + self.block_rows, src.n_rows)
                yield offset + start, offset + stop, self.convert(src.read(start, stop))
            offset += src.n_rows

    def __iter__(self) -> Iterator[tuple[int, int, torch.Tensor]]:
        if not self._resident:
            yield from self._generate()
            return
        if self._cache is None:
            self._cache = list(self._generate())
        yield from self._cache

    def strided(self, max_rows: int, dtype: torch.dtype | None = None) -> Iterator[torch.Tensor]:
        """Evenly strided rows (at most ``max_rows`` of them), converted by blocks: a sample
        read straight from the sources, without a pass over the other rows."""
        stride = max(1, -(-self.n_rows // max_rows))
        rows = np.arange(0, self.n_rows, stride, dtype=np.int64)
        offset = 0
        for src in self.sources:
            local = rows[(rows >= offset) & (rows < offset + src.n_rows)] - offset
            for lo in range(0, local.size, self.block_rows):
                yield self.convert(src.read_rows(local[lo : lo + self.block_rows]), dtype)
            offset += src.n_rows


def torch_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """``torch.float64`` / ``torch.float32`` from a dtype or its name."""
    resolved: torch.dtype | None
    if isinstance(dtype, torch.dtype):
        resolved = dtype
    else:
        resolved = {"float64": torch.float64, "float32": torch.float32}.get(str(dtype))
        if resolved is None:
            raise ProbeInputError(f"Expected dtype 'float64' or 'float32', got {dtype!r} instead.")
    if resolved not in (torch.float64, torch.float32):
        raise ProbeInputError(f"Expected torch.float64 or torch.float32, got {resolved} instead.")
    return resolved
