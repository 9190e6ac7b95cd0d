"""Extraction: manifest split ─► loader ─► frozen encoder ─► poolings ─► cache entry.

Exports load lazily (:mod:`embedkit.lazy`): the request and its option sets come without torch.
"""

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from embedkit.extract.request import (
        DEFAULT_UNIT_ROWS,
        BadImagePolicy,
        Compression,
        ComputeDtype,
        ExtractionRequest,
        FingerprintMode,
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
else:
    from embedkit.lazy import lazy_exports

    __getattr__, __dir__ = lazy_exports(
        __name__,
        {
            "request": (
                "DEFAULT_UNIT_ROWS",
                "BadImagePolicy",
                "Compression",
                "ComputeDtype",
                "ExtractionRequest",
                "FingerprintMode",
                "ResizePolicy",
                "ShardPolicy",
                "StorageDtype",
            ),
            "runner": (
                "ExtractionPlan",
                "ExtractionResult",
                "content_fingerprint",
                "extract",
                "plan_extraction",
                "run_extraction",
            ),
        },
    )

__all__ = [
    "DEFAULT_UNIT_ROWS",
    "BadImagePolicy",
    "Compression",
    "ComputeDtype",
    "ExtractionPlan",
    "ExtractionRequest",
    "ExtractionResult",
    "FingerprintMode",
    "ResizePolicy",
    "ShardPolicy",
    "StorageDtype",
    "content_fingerprint",
    "extract",
    "plan_extraction",
    "run_extraction",
]
