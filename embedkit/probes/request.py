"""What to probe: the request value and the probe kinds it takes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

from embedkit.errors import EmbedkitError
from embedkit.probes.policies import DEFAULT_TOL, ProbeBackend
from embedkit.probes.registry import get_kind

#: How the slice features of a volume become one feature vector for a volume-level label.
VolumePooling = Literal["mean", "max"]


@dataclass(frozen=True, slots=True)
class ProbeRequest:
    """One probe run; every field that changes the result is part of the record id.

    The field defaults are the only defaults: `embedkit probe` and a pipeline's probe steps
    read them from here (through embedkit.study.options).
    """

    kind: str  # a registered probe kind: embedkit.probes.PROBE_KINDS
    model: str
    dataset: str
    resolution: int
    pooling: str | None = None  # default: cls+mean for linear / few-shot, cls for kNN
    entry: str | None = None  # a digest (prefix) when several entries match
    seed: int = 0
    n_boot: int = 1000
    ks: tuple[int, ...] = (10, 20, 100, 200)
    shots: tuple[int, ...] = (1, 2, 4, 8, 16)
    draws: int = 5
    max_iter: int = 1000  # solver iterations per C (DINOv2 protocol: 1000)
    tol: float = DEFAULT_TOL  # linear: stopping tolerance (1e-12: DINOv2's strict protocol)
    backend: ProbeBackend = "torch"  # linear / knn: torch, sklearn (CPU reference) or cuml (GPU)
    volume_pooling: VolumePooling = "mean"  # volume datasets: slice features -> one per volume
    overwrite: bool = False

    def __post_init__(self) -> None:
        get_kind(self.kind)  # an unknown kind: ConfigError naming the registered ones
        if self.volume_pooling not in get_args(VolumePooling):
            raise EmbedkitError(
                f"Expected volume_pooling one of {', '.join(get_args(VolumePooling))}, got "
                f"{self.volume_pooling!r} instead"
            )
        if self.tol <= 0:
            raise EmbedkitError(f"Expected tol > 0, got {self.tol} instead")
        if self.n_boot < 1 or self.draws < 1 or self.max_iter < 1 or not self.ks or not self.shots:
            raise EmbedkitError(
                f"Expected n_boot >= 1, draws >= 1 and non-empty ks and shots, got "
                f"n_boot={self.n_boot}, draws={self.draws}, ks={self.ks}, shots={self.shots}"
            )
