"""Probes on frozen features: logistic regression, SGD linear heads, kNN and few-shot.

Probe kinds are registered in :mod:`embedkit.probes.kinds` (protocol and lookup:
:mod:`embedkit.probes.registry`); :data:`PROBE_KINDS` is the tuple of their names, from which the
CLI and pipeline steps take their choices.
"""

from embedkit.probes.backends import ProbeInputError, column_stats
from embedkit.probes.fewshot import (
    FewShotDraw,
    FewShotResult,
    FewShotSamplingError,
    PatientLeakageError,
    run_fewshot,
    sample_fewshot,
)
from embedkit.probes.kinds import FewShotKind, KNNKind, LinearKind, SGDKind
from embedkit.probes.knn import DINO_KS, KNNProbe
from embedkit.probes.linear import DINOV2_CS, LogisticProbe, PathResult
from embedkit.probes.registry import (
    KindResult,
    ProbeData,
    ProbeKind,
    get_kind,
    register,
    registered_kinds,
)
from embedkit.probes.sgd import DINO_LR_GRID, SGDLinearProbe
from embedkit.probes.targets import holdout_split

#: The registered probe kinds (``linear``, ``knn``, ``fewshot``, ``sgd``), in registration order.
PROBE_KINDS: tuple[str, ...] = registered_kinds()

__all__ = [
    "DINOV2_CS",
    "DINO_KS",
    "DINO_LR_GRID",
    "PROBE_KINDS",
    "FewShotDraw",
    "FewShotKind",
    "FewShotResult",
    "FewShotSamplingError",
    "KNNKind",
    "KNNProbe",
    "KindResult",
    "LinearKind",
    "LogisticProbe",
    "PathResult",
    "PatientLeakageError",
    "ProbeData",
    "ProbeInputError",
    "ProbeKind",
    "SGDKind",
    "SGDLinearProbe",
    "column_stats",
    "get_kind",
    "holdout_split",
    "register",
    "registered_kinds",
    "run_fewshot",
    "sample_fewshot",
]
