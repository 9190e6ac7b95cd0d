"""The embedkit error family.

Every error a user can cause derives from :class:`EmbedkitError` and also from the matching
built-in exception, so callers can catch either. Messages name what was expected, what was
received, and the fix. The CLI prints them without a traceback and exits with status 2.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Sequence


class EmbedkitError(Exception):
    """Root of every error embedkit raises on purpose."""


class ManifestError(EmbedkitError, ValueError):
    """The data manifest, an index file or a label is invalid."""


class ConfigError(EmbedkitError, ValueError):
    """A pipeline file or an option value is invalid."""


class ImageReadError(EmbedkitError, ValueError):
    """One image could not be decoded (corrupt, truncated, unsupported)."""

    def __init__(self, path: object, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


class ImageNotFoundError(ImageReadError, FileNotFoundError):
    """An image named by the index does not exist."""


class BadImagesError(EmbedkitError, ValueError):
    """Several images failed under the `fail` policy; lists how many and which."""

    def __init__(self, failures: Sequence[tuple[str, str]], total: int) -> None:
        self.failures = list(failures)
        shown = "\n".join(f"  {image_id}: {why}" for image_id, why in self.failures[:10])
        more = f"\n  ... and {len(self.failures) - 10} more" if len(self.failures) > 10 else ""
        super().__init__(
            f"{len(self.failures)} of {total} images could not be read:\n{shown}{more}\n"
            "Fix or remove them, or pass --on-bad-image skip to leave them out "
            "(skipped IDs are recorded)."
        )


class UnknownModelError(EmbedkitError, LookupError):
    """A model name is neither registered nor a local directory nor a hub id."""


class ModelLoadError(EmbedkitError, RuntimeError):
    """A checkpoint could not be loaded (gated, missing, offline, wrong format)."""


class ResolutionError(EmbedkitError, ValueError):
    """A resolution the encoder cannot take."""


class CacheNotFoundError(EmbedkitError, FileNotFoundError):
    """No cache entry matches the request."""


class IncompleteEntryError(EmbedkitError, RuntimeError):
    """A cache entry is still being written or was interrupted."""


class EntryExistsError(EmbedkitError, FileExistsError):
    """Refusing to overwrite a completed cache entry or result."""


class CacheWriteError(EmbedkitError, OSError):
    """The cache root cannot be written (permissions, disk full, read-only credentials)."""


class IntegrityError(EmbedkitError, ValueError):
    """Stored data does not match its records (checksums, shapes, NaN/Inf)."""


class NotFittedError(EmbedkitError, ValueError, AttributeError):
    """An estimator was used before `fit`."""


class CheckpointError(EmbedkitError, ValueError):
    """A checkpoint that cannot be read or does not belong to this run."""


class MixedResultsError(EmbedkitError, ValueError):
    """A results folder holds records of different datasets under one dataset name."""


class FewShotSamplingError(EmbedkitError, ValueError):
    """Too few patients to draw n examples for a class / label."""


class PatientLeakageError(EmbedkitError, ValueError):
    """Training candidates include patients that belong to validation or test."""


class ProbeInputError(EmbedkitError, ValueError):
    """Features, targets or masks that a probe cannot use (shape, dtype, values)."""


class BackendUnavailableError(EmbedkitError, RuntimeError):
    """A probe backend whose library or device is missing (cuML without CUDA, say)."""


class ShardingError(EmbedkitError, ValueError):
    """The model does not fit the devices with any sharding this job can use."""


class UnknownPoolingError(EmbedkitError, ValueError):
    """A pooling name that does not exist, or that this encoder does not offer."""


class BootstrapError(EmbedkitError, ValueError):
    """Bootstrap inputs that do not fit (indices of the wrong size, unknown metric)."""


class MetricInputError(EmbedkitError, ValueError):
    """Targets, mask and scores do not fit together (shape, values, NaN scores)."""


class InvalidKeyError(EmbedkitError, ValueError):
    """A cache key field is missing or malformed."""


def did_you_mean(name: str, choices: Iterable[str], n: int = 3) -> str:
    """Return ``"; did you mean 'a' or 'b'?"`` for close matches, else an empty string."""
    close = difflib.get_close_matches(name, list(choices), n=n, cutoff=0.5)
    if not close:
        return ""
    quoted = [f"'{c}'" for c in close]
    joined = quoted[0] if len(quoted) == 1 else ", ".join(quoted[:-1]) + f" or {quoted[-1]}"
    return f"; did you mean {joined}?"
