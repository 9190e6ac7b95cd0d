"""The probes' closed option sets and protocol defaults, importable without torch (the CLI and the
pipeline schema read them)."""

from __future__ import annotations

from typing import Literal

__all__ = ["DEFAULT_TOL", "ProbeBackend"]

#: Who solves a linear or kNN probe: embedkit's torch solvers (CPU or GPU), scikit-learn (the CPU
#: reference), or cuML (GPU; imported only when asked for).
ProbeBackend = Literal["torch", "sklearn", "cuml"]

#: Default stopping tolerance of the logistic probe (gradient max-norm of the scaled objective),
#: chosen by measurement (benchmarks/RESULTS.md "Probe solvers"): the chosen C and the test AUROC
#: of tol 1e-12 to within 2e-6 on the ladder datasets; ``tol=1e-12`` is DINOv2's strict protocol.
DEFAULT_TOL = 1e-5
