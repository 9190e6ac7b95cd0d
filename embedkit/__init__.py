"""embedkit: a frozen-feature embedding store and probing toolkit for medical imaging."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("embedkit")
except PackageNotFoundError:  # running from a source tree without installing
    __version__ = "0.0.0+local"

__all__ = ["__version__"]
