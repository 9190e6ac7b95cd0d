"""Extraction: manifest split ─► loader ─► frozen encoder ─► poolings ─► cache entry."""

from embedkit.extract.request import (
    DEFAULT_UNIT_ROWS,
    BadImagePolicy,
    Compression,
    ComputeDtype,
    ExtractionRequest,
    ResizePolicy,
    ShardPolicy,
    StorageDtype,
)
from embedkit.extract.runner import (
    ExtractionPlan,
    ExtractionResult,
    content_fingerprint,
    extract,
    plan_extraction,
    run_extraction,
)

__all__ = [
    "DEFAULT_UNIT_ROWS",
    "BadImagePolicy",
    "Compression",
    "ComputeDtype",
    "ExtractionPlan",
    "ExtractionRequest",
    "ExtractionResult",
    "ResizePolicy",
    "ShardPolicy",
    "StorageDtype",
    "content_fingerprint",
    "extract",
    "plan_extraction",
    "run_extraction",
]
