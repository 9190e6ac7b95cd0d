"""Content-addressed, resumable feature store (Zarr v3) on local paths or fsspec URLs."""

from embedkit.store.backend import BACKENDS, Backend, register_backend
from embedkit.store.catalog import (
    EntrySummary,
    find_entry,
    list_entries,
    render_entries,
    render_info,
    verify_root,
)
from embedkit.store.entry import FeatureEntry, remove_entry
from embedkit.store.gc import GcCandidate, collect_garbage, parse_age, plan_gc
from embedkit.store.key import (
    FEATURE_FORMAT_VERSION,
    CacheKey,
    InvalidKeyError,
    canonical_json,
    digest_ids,
)
from embedkit.store.layout import DERIVED_POOLINGS
from embedkit.store.readcache import (
    LocalCopy,
    local_copy_status,
    open_local_copy,
    verify_local_copies,
)
from embedkit.store.root import CacheRoot, ObjectStat
from embedkit.store.transfer import CopiedObject, copy_entry
from embedkit.store.writer import COMPRESSIONS, Compression, PendingUnit

__all__ = [
    "BACKENDS",
    "COMPRESSIONS",
    "DERIVED_POOLINGS",
    "FEATURE_FORMAT_VERSION",
    "Backend",
    "CacheKey",
    "CacheRoot",
    "Compression",
    "CopiedObject",
    "EntrySummary",
    "FeatureEntry",
    "GcCandidate",
    "InvalidKeyError",
    "LocalCopy",
    "ObjectStat",
    "PendingUnit",
    "canonical_json",
    "collect_garbage",
    "copy_entry",
    "digest_ids",
    "find_entry",
    "list_entries",
    "local_copy_status",
    "open_local_copy",
    "parse_age",
    "plan_gc",
    "register_backend",
    "remove_entry",
    "render_entries",
    "render_info",
    "verify_local_copies",
    "verify_root",
]
