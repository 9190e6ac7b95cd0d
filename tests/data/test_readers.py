"""read_image: format dispatch, intensity scaling per bit depth, mode conversion, errors."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from embedkit.data.dicom import read_dicom
from embedkit.data.readers import read_image
from embedkit.errors import ImageNotFoundError, ImageReadError

WritePng = Callable[..., Path]


def _ramp(h: int, w: int, dtype: type[np.integer], high: int) -> np.ndarray:
    return np.linspace(0, high, h * w).round().astype(dtype).reshape(h, w)


def test_8bit_png_is_scaled_by_255(write_png: WritePng) -> None:
    pixels = _ramp(16, 20, np.uint8, 255)
    image = read_image(write_png("g8.png", pixels))
    assert image.dtype == np.float32
    assert image.shape == (16, 20)
    np.testing.assert_array_equal(image, pixels.astype(np.float32) / np.float32(255))


def test_16bit_png_keeps_its_16_bits(write_png: WritePng) -> None:
    pixels = _ramp(64, 64, np.uint16, 65535)
    pixels[0, :3] = (1, 257, 65535)
    image = read_image(write_png("g16.png", pixels))
    assert image.dtype == np.float32
    np.testing.assert_array_equal(image, pixels.astype(np.float32) / np.float32(65535))
    # 1 and 257 would collapse to the same 8-bit value; they must stay distinct.
    assert image[0, 0] < image[0, 1] < image[0, 2] == 1.0
    assert len(np.unique(image)) > 256


def test_rgb_png_keeps_three_channels(write_png: WritePng) -> None:
    pixels = np.zeros((8, 10, 3), dtype=np.uint8)
    pixels[..., 0], pixels[..., 2] = 255, 51
    image = read_image(write_png("rgb.png", pixels))
    assert image.shape == (8, 10, 3)
    np.testing.assert_array_equal(image[0, 0], np.array([1.0, 0.0, 0.2], dtype=np.float32))


def test_alpha_is_dropped(write_png: WritePng) -> None:
    rgba = np.full((4, 4, 4), 200, dtype=np.uint8)
    rgba[..., 3] = 0  # fully transparent: values are kept, alpha dropped
    assert read_image(write_png("rgba.png", rgba)).shape == (4, 4, 3)
    la = write_png("la.png", np.full((4, 4), 100, dtype=np.uint8), mode="LA")
    image = read_image(la)
    assert image.shape == (4, 4)
    np.testing.assert_allclose(image, 100 / 255, rtol=1e-6)


def test_palette_with_transparency_becomes_rgb(tmp_path: Path) -> None:
    image = Image.new("P", (6, 5))
    image.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    image.putpixel((1, 1), 1)
    image.info["transparency"] = 0
    path = tmp_path / "p.png"
    image.save(path, transparency=0)
    pixels = read_image(path)  # pytest turns Pillow's transparency warning into an error
    assert pixels.shape == (5, 6, 3)
    np.testing.assert_array_equal(pixels[1, 1], np.array([1, 0, 0], dtype=np.float32))
    assert pixels[0, 0].sum() == 0


def test_bilevel_png_reads_as_zero_one(write_png: WritePng) -> None:
    bits = np.zeros((4, 8), dtype=bool)
    bits[:, :4] = True
    image = read_image(write_png("bw.png", bits))
    np.testing.assert_array_equal(image, bits.astype(np.float32))


def test_jpeg_reads_close_to_its_source(tmp_path: Path) -> None:
    pixels = _ramp(32, 32, np.uint8, 255)
    path = tmp_path / "g.jpg"
    Image.fromarray(pixels).save(path, quality=95)
    image = read_image(path)
    assert image.shape == (32, 32)
    assert np.abs(image - pixels / 255).max() < 0.05


def test_dispatch_is_by_content_before_suffix(write_png: WritePng, tmp_path: Path) -> None:
    png = write_png("x.png", _ramp(4, 4, np.uint8, 255))
    misnamed = tmp_path / "actually_png.jpg"
    shutil.copy(png, misnamed)
    np.testing.assert_array_equal(read_image(misnamed), read_image(png))


def test_dicom_without_suffix_is_found_by_magic(
    dicom_file: Callable[[str], Path], tmp_path: Path
) -> None:
    source = dicom_file("CT_small.dcm")
    bare = tmp_path / "IM0001"
    shutil.copy(source, bare)
    np.testing.assert_array_equal(read_image(bare), read_dicom(source))


def test_dicom_without_preamble_is_found_by_suffix(dicom_file: Callable[[str], Path]) -> None:
    image = read_image(dicom_file("OT-PAL-8-face.dcm"))  # no DICM marker in this file
    assert image.shape == (480, 640, 3)


def test_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.png"
    with pytest.raises(ImageNotFoundError, match=r"nope\.png") as info:
        read_image(missing)
    assert isinstance(info.value, FileNotFoundError)
    assert info.value.path == str(missing)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_image_is_an_error(tmp_path: Path, fmt: str) -> None:
    rng = np.random.default_rng(0)
    path = tmp_path / f"t.{fmt.lower()}"
    Image.fromarray(rng.integers(0, 255, (64, 64), dtype=np.uint8)).save(path, format=fmt)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageReadError, match=r"t\.(png|jpeg): corrupt or truncated"):
        read_image(path)


def test_corrupt_png_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "garbage.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 100)
    with pytest.raises(ImageReadError, match=r"garbage\.png"):
        read_image(path)


def test_unknown_format_names_the_supported_ones(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("not an image")
    with pytest.raises(ImageReadError, match=r"unknown image format.*PNG.*JPEG.*DICOM"):
        read_image(path)


def test_directory_is_an_error(tmp_path: Path) -> None:
    folder = tmp_path / "scan.png"
    folder.mkdir()
    with pytest.raises(ImageReadError, match="cannot open"):
        read_image(folder)
