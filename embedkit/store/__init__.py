"""Content-addressed, resumable feature store (Zarr v3) on local paths or fsspec URLs.

Where things live:

* ``backend.py``: the storage primitives (:class:`Backend`: exclusive create, atomic write,
  ranged read, list, delete, sync), ``LocalBackend`` and ``FsspecBackend``, registered by URL
  scheme (a new kind of storage: one module with its class, one :func:`register_backend`);
* ``root.py``: :class:`CacheRoot`, a backend plus read-only handling and error messages;
* ``key.py``: :class:`CacheKey`, the identity of an entry;
* ``layout.py`` (files of an entry, ``DERIVED_POOLINGS``), ``writer.py``, ``reader.py``,
  ``verify.py``, with :class:`FeatureEntry` (``entry.py``) as their facade; ``chunkio.py`` and
  ``checks.py`` are the fast local chunk I/O and the NaN/Inf and checksum scans;
* ``lease.py`` (claims of concurrent writers), ``catalog.py`` and ``index.py`` (listing),
  ``gc.py``, ``transfer.py`` (push/pull), ``readcache.py`` (local copies of remote entries).
"""

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
