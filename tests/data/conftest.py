"""Fixtures for the data-layer tests: real DICOM test files and small images written on the fly."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom.data
import pytest
from PIL import Image

_BUNDLED = Path(pydicom.data.__file__).parent / "test_files"
HAS_PYDICOM_DATA = importlib.util.find_spec("data_store") is not None
PYDICOM_DATA_MISSING = (
    "needs the pydicom-data package (installed with the `dev` extra: pip install -e '.[dev]'), "
    "which ships the real CR radiographs and their compressed twins; without it pydicom would "
    "try to download them"
)


@pytest.fixture
def dicom_file() -> Callable[[str], Path]:
    """Path of a pydicom test file by exact name (never a glob: globs trigger downloads)."""

    def find(name: str) -> Path:
        if not (_BUNDLED / name).is_file() and not HAS_PYDICOM_DATA:
            pytest.skip(PYDICOM_DATA_MISSING)
        path = pydicom.data.get_testdata_file(name)
        assert path is not None, f"pydicom test file {name} not found"
        return Path(path)

    return find


@pytest.fixture
def write_png(tmp_path: Path) -> Callable[..., Path]:
    """Write an array (uint8/uint16 gray, uint8 RGB) as a PNG in tmp_path and return its path."""

    def write(name: str, pixels: np.ndarray, mode: str | None = None) -> Path:
        path = tmp_path / name
        image = Image.fromarray(pixels) if mode is None else Image.fromarray(pixels).convert(mode)
        image.save(path, format="PNG")
        return path

    return write
