"""Read one DICOM image into a float32 array in [0, 1].

Policy, in the order it is applied:

* **Frame.** Multi-frame files give their first frame only (frame index 0); only that frame is
  decoded.
* **Decoding.** pydicom 3 decodes native pixel data itself and compressed transfer syntaxes
  (JPEG 2000, JPEG lossless/baseline, JPEG-LS, RLE, HTJ2K) through whichever installed plugin
  supports them (pylibjpeg-openjpeg, pylibjpeg-libjpeg, Pillow). A syntax without an installed
  decoder is an :class:`~embedkit.errors.ImageReadError` that names the package to install.
* **Grayscale** (``MONOCHROME1``/``MONOCHROME2``):

  1. the Modality LUT (Rescale Slope/Intercept or a Modality LUT Sequence) gives modality values
     (e.g. Hounsfield units), see :func:`read_modality_values`;
  2. VOI: when the file has Window Center/Width, the first window is applied with the file's
     VOI LUT Function (``LINEAR`` by default, ``LINEAR_EXACT`` or ``SIGMOID``) per DICOM PS3.3
     C.11.2.1.2-3, mapped to [0, 1]. A window that is invalid for its function (width < 1 for
     ``LINEAR``, <= 0 otherwise) is ignored. Without a (valid) window the **default is the
     min-max of the modality values** of the frame (a constant frame gives zeros). A VOI LUT
     Sequence (a non-linear table) is not applied;
  3. ``MONOCHROME1`` is inverted (``1 - v``) so that higher always means brighter, as in
     ``MONOCHROME2``.

* **Colour** gives (H, W, 3): ``RGB`` and ``YBR_*`` (converted to RGB by pydicom or the decoder)
  are scaled by ``2**BitsStored - 1``; ``PALETTE COLOR`` goes through its colour LUT and is scaled
  by the maximum of the LUT's bit depth.

Every failure (missing file, not DICOM, no pixel data, truncated data, unsupported photometric
interpretation or transfer syntax) is an :class:`~embedkit.errors.ImageReadError`; pydicom's
exceptions never escape. Warnings pydicom emits while reading are folded into the error message
when the read fails and logged at DEBUG level when it succeeds (this uses
``warnings.catch_warnings``, which is not thread-safe: read from processes, not threads).
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pydicom
import pydicom.uid
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.pixels import apply_color_lut, apply_modality_lut, get_decoder, pixel_array

from embedkit.errors import ImageNotFoundError, ImageReadError

__all__ = [
    "SUPPORTED_PHOTOMETRIC",
    "read_dicom",
    "read_dicom_header",
    "read_frames_modality_values",
    "read_modality_values",
]

logger = logging.getLogger(__name__)

_GRAYSCALE = ("MONOCHROME1", "MONOCHROME2")
_RGB_LIKE = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT")

# pip packages that provide a decoder, by transfer syntax family.
_PLUGIN_HINTS: dict[str, tuple[str, ...]] = {
    "pip install pylibjpeg pylibjpeg-openjpeg": (
        *pydicom.uid.JPEG2000TransferSyntaxes,
        pydicom.uid.HTJ2K,
        pydicom.uid.HTJ2KLossless,
        pydicom.uid.HTJ2KLosslessRPCL,
    ),
    "pip install pylibjpeg pylibjpeg-libjpeg": (
        *pydicom.uid.JPEGTransferSyntaxes,
        *pydicom.uid.JPEGLSTransferSyntaxes,
    ),
    "pip install pylibjpeg pylibjpeg-rle": tuple(pydicom.uid.RLETransferSyntaxes),
}

_ENCODING_TO_SYNTAX = {
    (True, True): pydicom.uid.ImplicitVRLittleEndian,
    (False, True): pydicom.uid.ExplicitVRLittleEndian,
    (False, False): pydicom.uid.ExplicitVRBigEndian,
}


def read_dicom(path: str | os.PathLike[str]) -> np.ndarray:
    """Return the first frame of a DICOM file as float32 (H, W) or (H, W, 3) in [0, 1].

    See the module docstring for the full policy: Modality LUT, then the file's first window
    (default: min-max of the modality values), ``MONOCHROME1`` inverted; colour as RGB.
    """
    path = Path(path)
    with _pydicom_warnings(path):
        ds, frame = _load_first_frame(path)
        photometric = str(ds.PhotometricInterpretation).strip()
        convert = _PHOTOMETRIC[photometric]
        try:
            image = convert(ds, frame)
        except Exception as exc:
            reason = _explain(f"could not convert {photometric} pixels", exc)
            raise ImageReadError(path, reason) from exc
    return np.ascontiguousarray(np.clip(image, 0.0, 1.0), dtype=np.float32)


def read_modality_values(path: str | os.PathLike[str]) -> np.ndarray:
    """Return the first frame of a grayscale DICOM file as float64 modality values.

    These are the stored values after the Modality LUT: ``stored * RescaleSlope +
    RescaleIntercept``, or the Modality LUT Sequence when the file has one.
    """
    path = Path(path)
    with _pydicom_warnings(path):
        ds, frame = _load_first_frame(path)
        photometric = str(ds.PhotometricInterpretation).strip()
        if photometric not in _GRAYSCALE:
            raise ImageReadError(
                path,
                f"modality values exist only for grayscale images; expected one of "
                f"{', '.join(_GRAYSCALE)}, got {photometric} instead",
            )
        return _modality_values(ds, frame)


@contextmanager
def _pydicom_warnings(path: Path) -> Iterator[None]:
    """Record pydicom's warnings: add them to an ImageReadError, else log them at DEBUG."""
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        try:
            yield
        except ImageReadError as exc:
            notes = "; ".join(dict.fromkeys(str(w.message) for w in records))
            if not notes:
                raise
            raise type(exc)(exc.path, f"{exc.reason} (pydicom warned: {notes})") from exc
    for w in records:
        logger.debug("%s: pydicom warned: %s", path, w.message)


def read_frames_modality_values(path: str | os.PathLike[str]) -> tuple[Dataset, np.ndarray]:
    """The dataset and all frames of a grayscale DICOM file as float64 modality values (F, H, W).

    Each frame gets its own Rescale Slope/Intercept: from the frame's Pixel Value Transformation
    Sequence (enhanced multi-frame objects), else the shared one, else the top-level attributes
    (or the Modality LUT Sequence). A single-frame file gives one frame.
    """
    path = Path(path)
    with _pydicom_warnings(path):
        ds, frames = _load_first_frame(path, all_frames=True)
        photometric = str(ds.PhotometricInterpretation).strip()
        if photometric not in _GRAYSCALE:
            raise ImageReadError(
                path,
                f"volumes must be grayscale; expected one of {', '.join(_GRAYSCALE)}, "
                f"got {photometric} instead",
            )
        if frames.ndim == 2:
            frames = frames[None]
        values = np.empty(frames.shape, dtype=np.float64)
        for i, frame in enumerate(frames):
            rescale = _frame_rescale(ds, i)
            if rescale is None:
                values[i] = _modality_values(ds, frame)
            else:
                values[i] = frame.astype(np.float64) * rescale[0] + rescale[1]
    return ds, values


def read_dicom_header(path: str | os.PathLike[str]) -> Dataset:
    """The dataset of a DICOM file without its pixel data (for geometry and ordering)."""
    path = Path(path)
    try:
        return pydicom.dcmread(path, stop_before_pixels=True)
    except FileNotFoundError as exc:
        raise ImageNotFoundError(path, "no such file") from exc
    except Exception as exc:
        raise ImageReadError(path, _explain("not a readable DICOM file", exc)) from exc


def _frame_rescale(ds: Dataset, index: int) -> tuple[float, float] | None:
    """(slope, intercept) of frame ``index`` from the functional groups, if they hold one."""
    for groups in ("PerFrameFunctionalGroupsSequence", "SharedFunctionalGroupsSequence"):
        sequence = ds.get(groups)
        if not sequence:
            continue
        item = sequence[index] if groups.startswith("PerFrame") else sequence[0]
        transform = item.get("PixelValueTransformationSequence")
        if transform and "RescaleSlope" in transform[0]:
            t = transform[0]
            return float(t.RescaleSlope), float(t.get("RescaleIntercept", 0.0))
    return None


def _load_first_frame(path: Path, all_frames: bool = False) -> tuple[Dataset, np.ndarray]:
    """Read the dataset, check it can be decoded and decode frame 0 (raw stored values), or all
    frames when ``all_frames``."""
    ds, forced = _read_dataset(path)
    if "PixelData" not in ds:
        raise ImageReadError(path, _why_no_pixels(ds, forced))
    photometric = str(ds.get("PhotometricInterpretation", "")).strip()
    if photometric not in _PHOTOMETRIC:
        raise ImageReadError(
            path,
            f"photometric interpretation {photometric or '(missing)'!r} is not supported; "
            f"supported: {', '.join(SUPPORTED_PHOTOMETRIC)}",
        )
    _require_decoder(path, ds)
    try:
        frame = pixel_array(ds) if all_frames else pixel_array(ds, index=0)
    except Exception as exc:
        raise ImageReadError(
            path, _explain("could not decode the pixel data (truncated or corrupt?)", exc)
        ) from exc
    return ds, frame


def _read_dataset(path: Path) -> tuple[Dataset, bool]:
    """``dcmread``, retried with ``force=True`` for files without the 128-byte preamble.

    Returns the dataset and whether it had to be forced.
    """
    forced = False
    try:
        try:
            ds = pydicom.dcmread(path)
        except InvalidDicomError:
            forced = True
            ds = pydicom.dcmread(path, force=True)
    except FileNotFoundError as exc:
        raise ImageNotFoundError(path, "no such file") from exc
    except Exception as exc:
        raise ImageReadError(path, _explain("not a readable DICOM file", exc)) from exc
    if "TransferSyntaxUID" not in ds.file_meta:
        implicit_vr, little_endian = ds.original_encoding
        syntax = _ENCODING_TO_SYNTAX.get((bool(implicit_vr), bool(little_endian)))
        if implicit_vr is None or syntax is None:
            raise ImageReadError(path, "has no Transfer Syntax UID and its encoding is unknown")
        ds.file_meta.TransferSyntaxUID = syntax
    return ds, forced


def _why_no_pixels(ds: Dataset, forced: bool) -> str:
    if forced:
        return "is not a DICOM file: no 'DICM' marker at byte 128 and no pixel data could be parsed"
    if "Rows" in ds and "Columns" in ds:
        return (
            "declares an image (Rows/Columns) but has no readable pixel data; "
            "the file is probably truncated or corrupt"
        )
    sop = ds.get("SOPClassUID")
    kind = f" (SOP class: {sop.name})" if sop is not None else ""
    return (
        f"has no pixel data{kind}; is it a DICOM SR/RT structure or another non-image object, "
        "or a file truncated before its pixel data? Only image objects can be read"
    )


def _require_decoder(path: Path, ds: Dataset) -> None:
    syntax = ds.file_meta.TransferSyntaxUID
    try:
        decoder = get_decoder(syntax)
    except NotImplementedError:
        raise ImageReadError(
            path,
            f"transfer syntax {_label(syntax)} has no pixel data decoder in pydicom "
            f"{pydicom.__version__}; convert the file to an uncompressed or JPEG 2000 syntax",
        ) from None
    if decoder.is_available:
        return
    hint = next((cmd for cmd, syntaxes in _PLUGIN_HINTS.items() if syntax in syntaxes), None)
    options = "; ".join(decoder.missing_dependencies) or "a pydicom decoding plugin"
    raise ImageReadError(
        path,
        f"no installed decoder for transfer syntax {_label(syntax)}; "
        f"{f'`{hint}`' if hint else 'install one of'} ({options})",
    )


def _label(syntax: pydicom.uid.UID) -> str:
    return str(syntax) if syntax.name == str(syntax) else f"{syntax.name} ({syntax})"


def _modality_values(ds: Dataset, frame: np.ndarray) -> np.ndarray:
    return np.asarray(apply_modality_lut(frame, ds), dtype=np.float64)


def _grayscale(invert: bool) -> Callable[[Dataset, np.ndarray], np.ndarray]:
    def convert(ds: Dataset, frame: np.ndarray) -> np.ndarray:
        values = _modality_values(ds, frame)
        window = _window(ds)
        image = _min_max(values) if window is None else window(values)
        return 1.0 - image if invert else image

    return convert


def _min_max(values: np.ndarray) -> np.ndarray:
    low, high = float(values.min()), float(values.max())
    if high <= low:
        return np.zeros_like(values)
    return (values - low) / (high - low)


def _first(value: object) -> float:
    """First value of a possibly multi-valued DS element."""
    if isinstance(value, list | tuple | MultiValue):
        value = value[0]
    return float(value)  # type: ignore[arg-type]


def _window(ds: Dataset) -> Callable[[np.ndarray], np.ndarray] | None:
    """The file's first window as a function of modality values to [0, 1], if it is valid."""
    if ds.get("WindowCenter") is None or ds.get("WindowWidth") is None:
        return None
    center, width = _first(ds.WindowCenter), _first(ds.WindowWidth)
    function = str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR").strip().upper()
    if function == "LINEAR" and width >= 1:
        # PS3.3 C.11.2.1.2.1: centre - 0.5, width - 1; width 1 is a threshold.
        if width == 1:
            return lambda x: (x > center - 0.5).astype(np.float64)
        return lambda x: np.clip((x - (center - 0.5)) / (width - 1) + 0.5, 0.0, 1.0)
    if function == "LINEAR_EXACT" and width > 0:
        return lambda x: np.clip((x - center) / width + 0.5, 0.0, 1.0)
    if function == "SIGMOID" and width > 0:
        return lambda x: 1.0 / (1.0 + np.exp(-4.0 * (x - center) / width))
    return None


def _rgb(ds: Dataset, frame: np.ndarray) -> np.ndarray:
    return frame.astype(np.float64) / float(2 ** int(ds.BitsStored) - 1)


def _palette(ds: Dataset, frame: np.ndarray) -> np.ndarray:
    rgb = apply_color_lut(frame, ds)
    bits = int(ds.RedPaletteColorLookupTableDescriptor[2])
    return np.asarray(rgb, dtype=np.float64) / float(2**bits - 1)


_PHOTOMETRIC: dict[str, Callable[[Dataset, np.ndarray], np.ndarray]] = {
    "MONOCHROME1": _grayscale(invert=True),
    "MONOCHROME2": _grayscale(invert=False),
    **dict.fromkeys(_RGB_LIKE, _rgb),
    "PALETTE COLOR": _palette,
}
SUPPORTED_PHOTOMETRIC: tuple[str, ...] = tuple(_PHOTOMETRIC)


def _explain(what: str, exc: BaseException) -> str:
    return f"{what}: {type(exc).__name__}: {exc}"
