"""read_dicom on real DICOM files: LUTs, windowing, MONOCHROME1, codecs and failures."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.pixels import apply_windowing, pixel_array
from pydicom.pixels.decoders.base import Decoder

from embedkit.data.dicom import SUPPORTED_PHOTOMETRIC, read_dicom, read_modality_values
from embedkit.errors import ImageNotFoundError, ImageReadError

DicomFile = Callable[[str], Path]


def _linear_window(values: np.ndarray, center: float, width: float) -> np.ndarray:
    """DICOM PS3.3 C.11.2.1.2.1 LINEAR window, written out, mapped to [0, 1]."""
    lo, hi = center - 0.5 - (width - 1) / 2, center - 0.5 + (width - 1) / 2
    out = ((values - (center - 0.5)) / (width - 1) + 0.5).astype(np.float64)
    return np.where(values <= lo, 0.0, np.where(values > hi, 1.0, out))


def _copy_with(source: Path, target: Path, **changes: object) -> Path:
    """Copy a DICOM file, setting (or with None, deleting) the given keywords."""
    ds = pydicom.dcmread(source)
    for keyword, value in changes.items():
        if value is None:
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    ds.save_as(target)
    return target


def test_monochrome1_is_windowed_then_inverted(dicom_file: DicomFile) -> None:
    path = dicom_file("RG3_UNCR.dcm")  # CR, MONOCHROME1, 10-bit, window 550/1024
    ds = pydicom.dcmread(path)
    raw = ds.pixel_array.astype(np.float64)
    image = read_dicom(path)
    assert image.dtype == np.float32
    assert image.shape == raw.shape == (1760, 1760)
    expected = 1.0 - _linear_window(raw, 550, 1024)
    np.testing.assert_allclose(image, expected, atol=1e-6)
    # independent reference: pydicom's own windowing, scaled by its output range
    pydicom_window = apply_windowing(raw, ds) / (2**ds.BitsStored - 1)
    np.testing.assert_allclose(image, 1.0 - pydicom_window, atol=1e-6)
    assert np.corrcoef(image.ravel(), raw.ravel())[0, 1] < -0.99


def test_monochrome2_is_not_inverted(dicom_file: DicomFile) -> None:
    path = dicom_file("MR_small.dcm")  # MONOCHROME2, window 600/1600
    raw = pydicom.dcmread(path).pixel_array.astype(np.float64)
    np.testing.assert_allclose(read_dicom(path), _linear_window(raw, 600, 1600), atol=1e-6)


def test_rescale_slope_and_intercept_give_modality_values(
    dicom_file: DicomFile, tmp_path: Path
) -> None:
    source = dicom_file("CT_small.dcm")  # slope 1, intercept -1024
    raw = pydicom.dcmread(source).pixel_array.astype(np.float64)
    np.testing.assert_array_equal(read_modality_values(source), raw - 1024)
    changed = _copy_with(source, tmp_path / "ct.dcm", RescaleSlope=2.5, RescaleIntercept=-300)
    values = read_modality_values(changed)
    np.testing.assert_array_equal(values, raw * 2.5 - 300)
    # the window applies to modality values, not stored values
    windowed = _copy_with(changed, tmp_path / "ct_w.dcm", WindowCenter=400, WindowWidth=800)
    np.testing.assert_allclose(read_dicom(windowed), _linear_window(values, 400, 800), atol=1e-6)


def test_without_a_window_the_default_is_min_max(dicom_file: DicomFile, tmp_path: Path) -> None:
    source = dicom_file("RG3_UNCR.dcm")
    raw = pydicom.dcmread(source).pixel_array.astype(np.float64)
    bare = _copy_with(source, tmp_path / "nowin.dcm", WindowCenter=None, WindowWidth=None)
    image = read_dicom(bare)
    expected = 1.0 - (raw - raw.min()) / (raw.max() - raw.min())  # MONOCHROME1: inverted
    np.testing.assert_allclose(image, expected, atol=1e-6)
    assert image.min() == 0.0
    assert image.max() == 1.0
    assert not np.allclose(image, read_dicom(source), atol=0.01)  # the file's window differs


def test_first_of_several_windows_is_used(dicom_file: DicomFile, tmp_path: Path) -> None:
    source = dicom_file("MR_small.dcm")
    raw = pydicom.dcmread(source).pixel_array.astype(np.float64)
    two = _copy_with(source, tmp_path / "two.dcm", WindowCenter=[300, 900], WindowWidth=[400, 50])
    np.testing.assert_allclose(read_dicom(two), _linear_window(raw, 300, 400), atol=1e-6)


@pytest.mark.parametrize(
    ("compressed", "uncompressed"),
    [
        ("RG1_J2KR.dcm", "RG1_UNCR.dcm"),  # CR 15-bit, JPEG 2000 lossless
        ("RG3_J2KR.dcm", "RG3_UNCR.dcm"),  # CR 10-bit, JPEG 2000 lossless
        ("MR_small_jp2klossless.dcm", "MR_small.dcm"),
        ("MR_small_jpeg_ls_lossless.dcm", "MR_small.dcm"),  # JPEG-LS
        ("MR_small_RLE.dcm", "MR_small.dcm"),
        ("MR_small_bigendian.dcm", "MR_small.dcm"),
        ("emri_small_jpeg_2k_lossless.dcm", "emri_small.dcm"),  # multi-frame
    ],
)
def test_lossless_syntaxes_decode_like_their_uncompressed_twin(
    dicom_file: DicomFile, compressed: str, uncompressed: str
) -> None:
    packed, plain = dicom_file(compressed), dicom_file(uncompressed)
    assert pydicom.dcmread(packed).file_meta.TransferSyntaxUID != (
        pydicom.dcmread(plain).file_meta.TransferSyntaxUID
    )
    np.testing.assert_array_equal(pixel_array(packed, index=0), pixel_array(plain, index=0))
    np.testing.assert_array_equal(read_dicom(packed), read_dicom(plain))


def test_lossy_jpeg2000_is_close_to_the_original(dicom_file: DicomFile) -> None:
    lossy, plain = read_dicom(dicom_file("RG1_J2KI.dcm")), read_dicom(dicom_file("RG1_UNCR.dcm"))
    difference = np.abs(lossy - plain)
    assert 0 < difference.mean() < 0.005


@pytest.mark.parametrize("name", ["JPGLosslessP14SV1_1s_1f_8b.dcm", "JPEG-LL.dcm"])
def test_jpeg_lossless_decodes(dicom_file: DicomFile, name: str) -> None:
    path = dicom_file(name)
    ds = pydicom.dcmread(path)
    assert ds.file_meta.TransferSyntaxUID == pydicom.uid.JPEGLosslessSV1
    image = read_dicom(path)
    assert image.shape == (ds.Rows, ds.Columns)
    assert image.min() >= 0.0
    assert image.max() <= 1.0
    assert image.std() > 0.05  # real content, not a blank frame


def test_multi_frame_gives_the_first_frame(dicom_file: DicomFile) -> None:
    path = dicom_file("emri_small.dcm")  # 10 frames, no window: min-max of frame 0
    frames = pydicom.dcmread(path).pixel_array.astype(np.float64)
    first = frames[0]
    assert not np.array_equal(first, frames[1])
    expected = (first - first.min()) / (first.max() - first.min())
    np.testing.assert_allclose(read_dicom(path), expected, atol=1e-6)


def test_rgb_and_ybr_give_the_same_rgb_image(dicom_file: DicomFile) -> None:
    rgb = read_dicom(dicom_file("SC_rgb.dcm"))
    ybr = read_dicom(dicom_file("SC_ybr_full_uncompressed.dcm"))
    assert rgb.shape == ybr.shape == (100, 100, 3)
    np.testing.assert_array_equal(rgb, pixel_array(dicom_file("SC_rgb.dcm")) / np.float32(255))
    difference = np.abs(rgb - ybr)  # YBR_FULL -> RGB conversion rounding only
    assert difference.max() <= 8 / 255
    assert difference.mean() < 1 / 255


def test_palette_color_goes_through_its_lut(dicom_file: DicomFile) -> None:
    path = dicom_file("OT-PAL-8-face.dcm")  # 8-bit indices, 200-entry 16-bit LUTs, no preamble
    ds = pydicom.dcmread(path, force=True)
    indices = np.frombuffer(ds.PixelData, dtype=np.uint8).reshape(ds.Rows, ds.Columns)
    image = read_dicom(path)
    assert image.shape == (480, 640, 3)
    for channel, colour in enumerate(("Red", "Green", "Blue")):
        lut = np.frombuffer(getattr(ds, f"{colour}PaletteColorLookupTableData"), dtype="<u2")
        expected = lut[np.minimum(indices, len(lut) - 1)] / 65535
        np.testing.assert_allclose(image[..., channel], expected, atol=1e-6)
    assert not np.allclose(image[..., 0], image[..., 2])  # colour, not gray replicated


def test_no_pixel_data_is_explained(dicom_file: DicomFile) -> None:
    with pytest.raises(ImageReadError, match=r"no pixel data \(SOP class: RT Plan Storage\)"):
        read_dicom(dicom_file("rtplan.dcm"))


def test_unsupported_photometric_is_named(dicom_file: DicomFile, tmp_path: Path) -> None:
    path = _copy_with(
        dicom_file("CT_small.dcm"), tmp_path / "hsv.dcm", PhotometricInterpretation="HSV"
    )
    with pytest.raises(ImageReadError, match="'HSV' is not supported") as info:
        read_dicom(path)
    assert all(name in info.value.reason for name in SUPPORTED_PHOTOMETRIC)


def test_missing_decoder_says_what_to_install(
    dicom_file: DicomFile, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(Decoder, "is_available", property(lambda self: False))
    with pytest.raises(ImageReadError, match="`pip install pylibjpeg pylibjpeg-openjpeg`"):
        read_dicom(dicom_file("MR_small_jp2klossless.dcm"))


def test_transfer_syntax_without_any_decoder(dicom_file: DicomFile, tmp_path: Path) -> None:
    path = tmp_path / "private.dcm"
    ds = pydicom.dcmread(dicom_file("CT_small.dcm"))
    ds.file_meta.TransferSyntaxUID = pydicom.uid.UID("1.2.826.0.1.3680043.9.9999.1")  # private
    ds.save_as(path, implicit_vr=False, little_endian=True)
    with pytest.raises(ImageReadError, match=r"3680043\.9\.9999\.1 has no pixel data decoder"):
        read_dicom(path)


@pytest.mark.parametrize(("name", "fraction"), [("CT_small.dcm", 0.6), ("RG3_J2KR.dcm", 0.5)])
def test_truncated_file_is_an_error(
    dicom_file: DicomFile, tmp_path: Path, name: str, fraction: float
) -> None:
    data = dicom_file(name).read_bytes()
    path = tmp_path / name
    path.write_bytes(data[: int(len(data) * fraction)])
    with pytest.raises(ImageReadError, match="truncated"):
        read_dicom(path)


def test_not_a_dicom_file(tmp_path: Path) -> None:
    path = tmp_path / "fake.dcm"
    path.write_bytes(b"\x00" * 64)
    with pytest.raises(ImageReadError, match=r"fake\.dcm"):
        read_dicom(path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ImageNotFoundError, match="no such file"):
        read_dicom(tmp_path / "absent.dcm")


def test_modality_values_refuse_colour(dicom_file: DicomFile) -> None:
    with pytest.raises(ImageReadError, match="expected one of MONOCHROME1, MONOCHROME2, got RGB"):
        read_modality_values(dicom_file("SC_rgb.dcm"))
