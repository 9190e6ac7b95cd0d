"""Content-addressed, resumable feature store (Zarr v3) on local paths or fsspec URLs."""

from embedkit.store.catalog import (
    EntrySummary,
    find_entry,
    list_entries,
    render_entries,
    render_info,
    verify_root,
)
from embedkit.store.entry import DERIVED_POOLINGS, FeatureEntry, remove_entry
from embedkit.store.key import (
    FEATURE_FORMAT_VERSION,
    CacheKey,
    InvalidKeyError,
    canonical_json,
    digest_ids,
)
from embedkit.store.root import CacheRoot

__all__ = [
    "DERIVED_POOLINGS",
    "FEATURE_FORMAT_VERSION",
    "CacheKey",
    "CacheRoot",
    "EntrySummary",
    "FeatureEntry",
    "InvalidKeyError",
    "canonical_json",
    "digest_ids",
    "find_entry",
    "list_entries",
    "remove_entry",
    "render_entries",
    "render_info",
    "verify_root",
]
