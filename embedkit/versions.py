"""Library versions recorded in every cache entry and result record (provenance)."""

from __future__ import annotations

import platform
from importlib.metadata import PackageNotFoundError, version

#: What every record names: the numbers depend on these.
CORE_PACKAGES: tuple[str, ...] = ("embedkit", "torch", "transformers", "zarr", "numpy")


def package_versions(*extra: str) -> dict[str, str]:
    """Python and the versions of :data:`CORE_PACKAGES` plus ``extra`` (or "not installed")."""
    out = {"python": platform.python_version()}
    for pkg in (*CORE_PACKAGES, *extra):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "not installed"
    return out
