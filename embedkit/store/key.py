"""The cache key: everything that determines the bytes of a feature cache entry.

A :class:`CacheKey` is a frozen value object, validated when built. Its :meth:`CacheKey.digest`
is the sha256 of the canonical JSON of every field; it names the entry on disk, so it must stay
stable across processes, machines and Python versions (a test pins it to a known value).

The storage codec and chunk geometry are deliberately not in the key: they change the files,
not the feature values an entry serves (unit checksums are over the decoded values), so an
uncompressed and a zstd entry of one key are interchangeable. Each entry records its codec in
its attributes (``compression``, shown by ``embedkit cache info``) and in each array's
``zarr.json``.

A *feature space* (:meth:`CacheKey.feature_space`) is the key without what depends only on
which images are in the entry (:data:`IMAGE_LIST_FIELDS`: the dataset name, the id list, the
images' content fingerprint and their number). Two entries of one feature space hold the same
features for the same image bytes, so a new entry copies such rows from a complete one instead
of computing them (:mod:`embedkit.store.reuse`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from embedkit.errors import InvalidKeyError

__all__ = [
    "COMPUTE_DTYPES",
    "FEATURE_FORMAT_VERSION",
    "IMAGE_LIST_FIELDS",
    "STORAGE_DTYPES",
    "CacheKey",
    "InvalidKeyError",
    "canonical_json",
    "digest_ids",
]

#: 2: entries of layout 2 (arrays with dimension names, records under ``image/embedkit``; see
#: :mod:`embedkit.store.layout`), so entries of layout 1 are never opened for writing.
FEATURE_FORMAT_VERSION = 2
COMPUTE_DTYPES = frozenset({"fp32", "bf16", "fp16"})
STORAGE_DTYPES = frozenset({"float16", "float32"})
#: The key fields that depend only on which images an entry holds; every other field is part
#: of the entry's feature space (:meth:`CacheKey.feature_space`).
IMAGE_LIST_FIELDS = frozenset({"dataset", "ids_digest", "content_digest", "n_images"})

_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_POOLING = re.compile(r"^[a-z0-9_]+$")
_UNSAFE = re.compile(r"[^A-Za-z0-9._=-]+")


def _plain(obj: Any) -> Any:
    """Turn ``obj`` into plain JSON types (tuples become lists); reject anything else."""
    if obj is None or isinstance(obj, bool | int | str):
        return obj
    if isinstance(obj, float):
        if not math.isfinite(obj):
            raise InvalidKeyError(
                f"Expected a finite float in canonical JSON, got {obj!r} instead."
            )
        return obj
    if isinstance(obj, Mapping):
        out: dict[str, Any] = {}
        for k, v in obj.items():
            if not isinstance(k, str):
                raise InvalidKeyError(f"Expected string keys in canonical JSON, got {k!r} instead.")
            out[k] = _plain(v)
        return out
    if isinstance(obj, list | tuple):
        return [_plain(v) for v in obj]
    raise InvalidKeyError(
        f"Expected JSON-compatible values (dict, list, str, int, float, bool, None), "
        f"got {type(obj).__name__} {obj!r} instead."
    )


def canonical_json(obj: Any) -> str:
    """Serialise ``obj`` to one canonical string: sorted keys, no whitespace, UTF-8 text.

    Floats use Python's shortest round-trip ``repr`` (stable since Python 3.1), tuples become
    lists, and NaN/Inf or non-JSON types are rejected.
    """
    return json.dumps(
        _plain(obj), sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    )


def digest_ids(ids: Sequence[str]) -> str:
    """Return the sha256 hex digest of an ordered list of image ids."""
    h = hashlib.sha256()
    for image_id in ids:
        if not isinstance(image_id, str) or not image_id or "\n" in image_id:
            raise InvalidKeyError(
                f"Expected non-empty image ids without newlines, got {image_id!r} instead."
            )
        h.update(image_id.encode("utf-8"))
        h.update(b"\n")
    return h.hexdigest()


def _safe(part: str) -> str:
    cleaned = _UNSAFE.sub("_", part).strip("._")
    return cleaned or "_"


@dataclass(frozen=True, slots=True)
class CacheKey:
    """Identity of one feature cache entry; see the module docstring."""

    dataset: str
    model: str
    weights: str
    resolution: int
    preprocessing: str
    compute_dtype: str
    storage_dtype: str
    poolings: tuple[str, ...]
    ids_digest: str
    content_digest: str
    n_images: int
    format_version: int = field(default=FEATURE_FORMAT_VERSION)

    def __post_init__(self) -> None:
        for name in ("dataset", "model", "weights"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value.strip():
                raise InvalidKeyError(
                    f"CacheKey.{name}: expected a non-empty string, got {value!r}."
                )
        for name in ("resolution", "n_images", "format_version"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise InvalidKeyError(
                    f"CacheKey.{name}: expected a positive integer, got {value!r} instead."
                )
        try:
            parsed = json.loads(self.preprocessing)
        except (TypeError, json.JSONDecodeError) as exc:
            raise InvalidKeyError(
                f"CacheKey.preprocessing: expected JSON text built with canonical_json(dict), "
                f"got {self.preprocessing!r} instead."
            ) from exc
        if not isinstance(parsed, dict) or canonical_json(parsed) != self.preprocessing:
            raise InvalidKeyError(
                "CacheKey.preprocessing: expected the canonical JSON of a dict; "
                "build it with canonical_json(dict)."
            )
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise InvalidKeyError(
                f"CacheKey.compute_dtype: expected one of {sorted(COMPUTE_DTYPES)}, "
                f"got {self.compute_dtype!r} instead."
            )
        if self.storage_dtype not in STORAGE_DTYPES:
            raise InvalidKeyError(
                f"CacheKey.storage_dtype: expected one of {sorted(STORAGE_DTYPES)}, "
                f"got {self.storage_dtype!r} instead."
            )
        poolings = self.poolings
        if isinstance(poolings, str) or not isinstance(poolings, Sequence) or not poolings:
            raise InvalidKeyError(
                f"CacheKey.poolings: expected a non-empty tuple of pooling names, got {poolings!r}."
            )
        for p in poolings:
            if not isinstance(p, str) or not _POOLING.match(p):
                raise InvalidKeyError(
                    f"CacheKey.poolings: expected names like 'cls', 'mean', 'patch', got {p!r}."
                )
        if len(set(poolings)) != len(poolings):
            raise InvalidKeyError(f"CacheKey.poolings: duplicate names in {poolings!r}.")
        # Normalise to the sorted tuple so that equal sets give equal keys.
        object.__setattr__(self, "poolings", tuple(sorted(poolings)))
        for name in ("ids_digest", "content_digest"):
            value = getattr(self, name)
            if not isinstance(value, str) or not _HEX64.match(value):
                raise InvalidKeyError(
                    f"CacheKey.{name}: expected a lowercase sha256 hex digest (64 chars), "
                    f"got {value!r} instead."
                )

    def to_dict(self) -> dict[str, Any]:
        """Return the fields as plain JSON types (``poolings`` as a list)."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["poolings"] = list(self.poolings)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> CacheKey:
        """Rebuild a key from :meth:`to_dict` output; unknown or missing fields are errors."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise InvalidKeyError(f"Unknown CacheKey fields {unknown}; expected {sorted(names)}.")
        kwargs = dict(d)
        if "poolings" in kwargs and isinstance(kwargs["poolings"], list):
            kwargs["poolings"] = tuple(kwargs["poolings"])
        try:
            return cls(**kwargs)
        except TypeError as exc:
            raise InvalidKeyError(f"Incomplete CacheKey fields: {exc}") from exc

    def digest(self) -> str:
        """sha256 hex of the canonical JSON of all fields."""
        return hashlib.sha256(canonical_json(self.to_dict()).encode("utf-8")).hexdigest()

    def feature_space(self) -> str:
        """sha256 hex of the canonical JSON of the fields outside :data:`IMAGE_LIST_FIELDS`:
        model, weights fingerprint, resolution, preprocessing, dtypes, poolings, format version.

        Entries with equal feature spaces hold equal features for equal image bytes (whatever
        their dataset or image list), so rows can be copied between them.
        """
        d = {k: v for k, v in self.to_dict().items() if k not in IMAGE_LIST_FIELDS}
        return hashlib.sha256(canonical_json(d).encode("utf-8")).hexdigest()

    def short(self) -> str:
        """The first 16 hex characters of :meth:`digest`."""
        return self.digest()[:16]

    def relpath(self) -> str:
        """Path relative to a cache root, e.g. ``cxr/dinov3--vitb16/512px-<short>.zarr``."""
        model = "--".join(_safe(part) for part in self.model.split("/"))
        return f"{_safe(self.dataset)}/{model}/{self.resolution}px-{self.short()}.zarr"
