"""Probes on frozen features: logistic regression, SGD linear heads, kNN and few-shot.

Probe kinds are registered in :mod:`embedkit.probes.kinds` (protocol and lookup:
:mod:`embedkit.probes.registry`); :data:`PROBE_KINDS` is the tuple of their names, from which the
CLI and pipeline steps take their choices.

The kinds register on import of the package (cheap: the estimators load when a kind fits);
the other exports load lazily (:mod:`embedkit.lazy`).
"""

from typing import TYPE_CHECKING

from embedkit.probes import kinds as _kinds  # registers the shipped kinds
from embedkit.probes.registry import registered_kinds

if TYPE_CHECKING:
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
    from embedkit.probes.registry import KindResult, ProbeData, ProbeKind, get_kind, register
    from embedkit.probes.sgd import DINO_LR_GRID, SGDLinearProbe
    from embedkit.probes.targets import holdout_split
else:
    from embedkit.lazy import lazy_exports

    __getattr__, __dir__ = lazy_exports(
        __name__,
        {
            "backends": ("ProbeInputError", "column_stats"),
            "fewshot": (
                "FewShotDraw",
                "FewShotResult",
                "FewShotSamplingError",
                "PatientLeakageError",
                "run_fewshot",
                "sample_fewshot",
            ),
            "kinds": ("FewShotKind", "KNNKind", "LinearKind", "SGDKind"),
            "knn": ("DINO_KS", "KNNProbe"),
            "linear": ("DINOV2_CS", "LogisticProbe", "PathResult"),
            "registry": ("KindResult", "ProbeData", "ProbeKind", "get_kind", "register"),
            "sgd": ("DINO_LR_GRID", "SGDLinearProbe"),
            "targets": ("holdout_split",),
        },
    )

del _kinds

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
