"""Read one image file into a float32 array in [0, 1], whatever its format.

``read_image`` picks a reader from a small registry of formats: first by the file's magic bytes
(so a PNG named ``.jpg`` still reads), then by its suffix (for DICOM files without the 128-byte
preamble). Supported: PNG (8- and 16-bit), JPEG, DICOM (see :mod:`embedkit.data.dicom`). A
path-like object that reads itself (a :class:`PixelSource`, such as one slice of a CT or MRI volume,
:class:`embedkit.data.volumes.VolumeSlice`) is read by its own ``read()``.

Intensity policy for PNG/JPEG: integer images are scaled by the maximum of their integer type,
8-bit by 255 and 16-bit by 65535 (a 16-bit PNG keeps its 16 bits; it is never squeezed to 8).
Shapes: grayscale gives (H, W), colour gives (H, W, 3). Modes are converted as follows:
``1``/``LA`` -> grayscale (alpha dropped); ``P``/``PA``/``RGBA``/``CMYK``/``YCbCr`` -> RGB (alpha
dropped); RGB radiographs keep their 3 channels (the transform handles channels). Pillow reads
16-bit-per-channel colour PNGs as 8-bit RGB, so those lose their low byte.

Errors: a missing file is :class:`~embedkit.errors.ImageNotFoundError`; a corrupt, truncated or
unsupported file is :class:`~embedkit.errors.ImageReadError`. PIL decodes lazily, so the whole
image is decoded inside the reader and truncated files are never accepted
(``ImageFile.LOAD_TRUNCATED_IMAGES`` is left False).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
from PIL import Image

from embedkit.data.dicom import read_dicom
from embedkit.errors import ImageNotFoundError, ImageReadError

__all__ = ["FORMATS", "ImageFormat", "PixelSource", "read_image", "supported_formats"]

Reader = Callable[[Path], np.ndarray]


@dataclass(frozen=True, slots=True)
class ImageFormat:
    """One readable format: how to recognise it and the function that reads it."""

    name: str
    suffixes: tuple[str, ...]
    magic: bytes
    magic_offset: int
    read: Reader


@runtime_checkable
class PixelSource(Protocol):
    """A path-like image source that decodes itself (e.g. one slice of a volume)."""

    def __fspath__(self) -> str: ...

    def read(self) -> np.ndarray: ...


# Pillow mode -> (mode to convert to first, or None; divisor that maps the values to [0, 1]).
_PIL_MODES: dict[str, tuple[str | None, float]] = {
    "1": ("L", 255.0),
    "L": (None, 255.0),
    "LA": ("L", 255.0),
    "I;16": (None, 65535.0),
    "I;16L": (None, 65535.0),
    "I;16B": (None, 65535.0),
    "I": (None, 65535.0),  # 32-bit container Pillow may use for 16-bit grayscale PNGs
    "RGB": (None, 255.0),
    "RGBA": ("RGB", 255.0),
    "P": ("RGB", 255.0),
    "PA": ("RGB", 255.0),
    "CMYK": ("RGB", 255.0),
    "YCbCr": ("RGB", 255.0),
}


def _read_pil(path: Path) -> np.ndarray:
    """Decode a PNG/JPEG fully with Pillow and scale it to [0, 1] (see the module policy)."""
    try:
        with Image.open(path) as opened:
            opened.load()
            pixels, divisor = _pil_pixels(path, opened)
    except ImageReadError:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise ImageReadError(path, f"corrupt or truncated image: {exc}") from exc
    scaled = pixels.astype(np.float32) / np.float32(divisor)
    return np.clip(scaled, 0.0, 1.0, out=scaled)


def _pil_pixels(path: Path, image: Image.Image) -> tuple[np.ndarray, float]:
    """The decoded image as an array in a supported mode, and the divisor for its values."""
    if image.mode in ("P", "PA"):  # palette transparency must go through RGBA
        image = image.convert("RGBA")
    if image.mode not in _PIL_MODES:
        raise ImageReadError(
            path,
            f"Pillow image mode {image.mode!r} is not supported; "
            f"expected one of {', '.join(_PIL_MODES)}",
        )
    convert_to, divisor = _PIL_MODES[image.mode]
    if convert_to is not None:
        image = image.convert(convert_to)
    return np.asarray(image), divisor


FORMATS: tuple[ImageFormat, ...] = (
    ImageFormat("PNG", (".png",), b"\x89PNG\r\n\x1a\n", 0, _read_pil),
    ImageFormat("JPEG", (".jpg", ".jpeg"), b"\xff\xd8\xff", 0, _read_pil),
    ImageFormat("DICOM", (".dcm", ".dicom"), b"DICM", 128, read_dicom),
)
_BY_SUFFIX: dict[str, ImageFormat] = {s: fmt for fmt in FORMATS for s in fmt.suffixes}
_HEADER_BYTES = max(f.magic_offset + len(f.magic) for f in FORMATS)


def supported_formats() -> str:
    """Human-readable list of the supported formats and their suffixes."""
    return ", ".join(f"{f.name} ({'/'.join(f.suffixes)})" for f in FORMATS)


def read_image(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an image as float32 (H, W) or (H, W, 3) with values in [0, 1].

    Raises:
        ImageNotFoundError: the file does not exist.
        ImageReadError: the file is corrupt, truncated or in an unsupported format.
    """
    if isinstance(path, PixelSource):
        return path.read()
    path = Path(path)
    fmt = _detect(path)
    return fmt.read(path)


def _detect(path: Path) -> ImageFormat:
    try:
        with path.open("rb") as f:
            header = f.read(_HEADER_BYTES)
    except FileNotFoundError as exc:
        raise ImageNotFoundError(path, "no such file") from exc
    except OSError as exc:
        raise ImageReadError(path, f"cannot open the file: {exc}") from exc
    for fmt in FORMATS:
        if header[fmt.magic_offset : fmt.magic_offset + len(fmt.magic)] == fmt.magic:
            return fmt
    by_suffix = _BY_SUFFIX.get(path.suffix.lower())
    if by_suffix is not None:
        return by_suffix
    raise ImageReadError(
        path,
        f"unknown image format (suffix {path.suffix or '(none)'!r}, no known signature); "
        f"supported: {supported_formats()}",
    )
