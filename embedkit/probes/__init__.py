"""Probes on frozen features: logistic regression, SGD linear heads, kNN and few-shot."""

from embedkit.probes.backends import ProbeInputError, column_stats
from embedkit.probes.fewshot import (
    FewShotDraw,
    FewShotResult,
    FewShotSamplingError,
    PatientLeakageError,
    run_fewshot,
    sample_fewshot,
)
from embedkit.probes.knn import DINO_KS, KNNProbe
from embedkit.probes.linear import DINOV2_CS, LogisticProbe, PathResult
from embedkit.probes.sgd import DINO_LR_GRID, SGDLinearProbe
from embedkit.probes.targets import holdout_split

__all__ = [
    "DINOV2_CS",
    "DINO_KS",
    "DINO_LR_GRID",
    "FewShotDraw",
    "FewShotResult",
    "FewShotSamplingError",
    "KNNProbe",
    "LogisticProbe",
    "PathResult",
    "PatientLeakageError",
    "ProbeInputError",
    "SGDLinearProbe",
    "column_stats",
    "holdout_split",
    "run_fewshot",
    "sample_fewshot",
]
