"""Preprocessing: shapes, normalisation, resampling references, geometry, validation, snapping."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from embedkit.data.transforms import IMAGENET_MEAN, IMAGENET_STD, Preprocessing, snap_resolution
from embedkit.errors import ResolutionError

MEAN = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
STD = torch.tensor(IMAGENET_STD).view(3, 1, 1)


def _unnormalise(x: torch.Tensor) -> torch.Tensor:
    return x * STD + MEAN


@pytest.mark.parametrize("shape", [(30, 50), (30, 50, 1), (30, 50, 3)])
@pytest.mark.parametrize("resize", ["squash", "pad", "crop"])
def test_output_shape_and_dtype(shape: tuple[int, ...], resize: str) -> None:
    image = np.random.default_rng(0).random(shape, dtype=np.float32)
    out = Preprocessing(size=24, resize=resize)(image)  # type: ignore[arg-type]
    assert out.shape == (3, 24, 24)
    assert out.dtype == torch.float32
    assert out.is_contiguous()


def test_normalisation_of_a_constant_image() -> None:
    out = Preprocessing(size=8)(np.full((16, 16), 0.5, dtype=np.float32))
    for channel, (mean, std) in enumerate(zip(IMAGENET_MEAN, IMAGENET_STD, strict=True)):
        torch.testing.assert_close(out[channel], torch.full((8, 8), (0.5 - mean) / std))


def test_custom_mean_and_std() -> None:
    out = Preprocessing(size=4, mean=(0.5, 0.5, 0.5), std=(0.25, 0.5, 1.0))(np.ones((4, 4)))
    torch.testing.assert_close(out[:, 0, 0], torch.tensor([2.0, 1.0, 0.5]))


def test_grayscale_is_replicated_to_three_channels() -> None:
    image = np.random.default_rng(1).random((40, 40), dtype=np.float32)
    pixels = _unnormalise(Preprocessing(size=20)(image))
    torch.testing.assert_close(pixels[0], pixels[1])
    torch.testing.assert_close(pixels[0], pixels[2])


def test_rgb_channels_stay_apart() -> None:
    image = np.zeros((8, 8, 3), dtype=np.float32)
    image[..., 1] = 1.0
    pixels = _unnormalise(Preprocessing(size=8)(image))
    torch.testing.assert_close(pixels[:, 3, 3], torch.tensor([0.0, 1.0, 0.0]))


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
@pytest.mark.parametrize("antialias", [True, False])
def test_squash_equals_the_interpolate_reference(interpolation: str, antialias: bool) -> None:
    image = np.random.default_rng(2).random((64, 48), dtype=np.float32)
    pre = Preprocessing(size=16, interpolation=interpolation, antialias=antialias)  # type: ignore[arg-type]
    reference = F.interpolate(
        torch.from_numpy(image)[None, None],
        size=(16, 16),
        mode=interpolation,
        antialias=antialias,
        align_corners=False,
    )[0].clamp(0, 1)
    torch.testing.assert_close(_unnormalise(pre(image)), reference.expand(3, -1, -1))


def _triangle_weights(n_in: int, n_out: int) -> np.ndarray:
    """Antialiased bilinear (triangle filter stretched by the scale), hand-written, renormalised."""
    scale = n_in / n_out
    weights = np.zeros((n_out, n_in))
    for i in range(n_out):
        centre = (i + 0.5) * scale
        for j in range(n_in):
            weights[i, j] = max(0.0, 1.0 - abs(j + 0.5 - centre) / scale)
    return weights / weights.sum(axis=1, keepdims=True)


def test_antialiased_downsample_matches_a_hand_computed_triangle_filter() -> None:
    image = np.random.default_rng(3).random((12, 8))
    expected = _triangle_weights(12, 4) @ image @ _triangle_weights(8, 4).T
    # by hand for 8 -> 4: the first output column mixes inputs 0, 1, 2 as 3/7, 3/7, 1/7
    np.testing.assert_allclose(_triangle_weights(8, 4)[0, :4], [3 / 7, 3 / 7, 1 / 7, 0])
    out = _unnormalise(Preprocessing(size=4)(image.astype(np.float32)))[0]
    np.testing.assert_allclose(out.numpy(), expected, atol=1e-5)


def test_bilinear_upsample_uses_half_pixel_centres() -> None:
    image = np.array([[0.0, 1.0], [0.0, 1.0]], dtype=np.float32)
    row = _unnormalise(Preprocessing(size=4)(image))[0, 0]
    torch.testing.assert_close(row, torch.tensor([0.0, 0.25, 0.75, 1.0]))


def test_bicubic_overshoot_is_clamped() -> None:
    image = np.zeros((8, 8), dtype=np.float32)
    image[:, 4:] = 1.0
    pixels = _unnormalise(Preprocessing(size=32, interpolation="bicubic")(image))
    assert pixels.min() >= -1e-6
    assert pixels.max() <= 1 + 1e-6


def _bright_left_half() -> np.ndarray:
    image = np.zeros((100, 200), dtype=np.float32)  # H=100, W=200
    image[:, :100] = 1.0
    return image


def test_crop_keeps_the_centre_square() -> None:
    pixels = _unnormalise(Preprocessing(size=100, resize="crop")(_bright_left_half()))[0]
    torch.testing.assert_close(pixels, torch.from_numpy(_bright_left_half()[:, 50:150]))
    assert (pixels[:, :50] == 1).all()
    assert (pixels[:, 50:] == 0).all()


def test_pad_letterboxes_with_black_bands_top_and_bottom() -> None:
    pixels = _unnormalise(Preprocessing(size=100, resize="pad")(_bright_left_half()))[0]
    # 100x200 padded to 200x200 (50 black rows above and below), then halved
    torch.testing.assert_close(pixels[:24], torch.zeros(24, 100), atol=1e-6, rtol=0)
    torch.testing.assert_close(pixels[76:], torch.zeros(24, 100), atol=1e-6, rtol=0)
    torch.testing.assert_close(pixels[26:74, :49], torch.ones(48, 49), atol=1e-6, rtol=0)
    torch.testing.assert_close(pixels[26:74, 51:], torch.zeros(48, 49), atol=1e-6, rtol=0)


def test_squash_stretches_the_whole_image() -> None:
    pixels = _unnormalise(Preprocessing(size=100)(_bright_left_half()))[0]
    assert (pixels[:, :49] > 0.999).all()
    assert (pixels[:, 51:] < 0.001).all()


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"size": 0}, "size: expected a positive integer"),
        ({"size": True}, "size: expected a positive integer"),
        ({"size": 224.0}, "size: expected a positive integer"),
        (
            {"size": 8, "resize": "stretch"},
            "resize: expected one of squash, pad, crop, got 'stretch'",
        ),
        ({"size": 8, "interpolation": "nearest"}, "interpolation: expected one of bilinear"),
        ({"size": 8, "antialias": 1}, "antialias: expected a bool"),
        ({"size": 8, "mean": (0.5, 0.5)}, "mean: expected 3 numbers"),
        ({"size": 8, "std": (0.2, 0.0, 0.2)}, r"std: expected 3 positive numbers, got \(0.2, 0.0"),
    ],
)
def test_invalid_fields_are_refused(fields: dict[str, object], match: str) -> None:
    with pytest.raises(ResolutionError, match=match) as info:
        Preprocessing(**fields)  # type: ignore[arg-type]
    assert isinstance(info.value, ValueError)
    assert "instead" in str(info.value)


def test_bad_image_shape_is_refused() -> None:
    with pytest.raises(ValueError, match=r"Expected an image of shape .*got \(4, 4, 4\) instead"):
        Preprocessing(size=4)(np.zeros((4, 4, 4), dtype=np.float32))


def test_describe_is_plain_json_with_every_field() -> None:
    pre = Preprocessing(size=224, resize="pad", mean=[0.5, 0.5, 0.5], std=(1, 1, 1))  # type: ignore[arg-type]
    described = pre.describe()
    assert described == {
        "version": Preprocessing.VERSION,
        "size": 224,
        "resize": "pad",
        "interpolation": "bilinear",
        "antialias": True,
        "mean": [0.5, 0.5, 0.5],
        "std": [1.0, 1.0, 1.0],
    }
    assert json.loads(json.dumps(described)) == described
    assert set(described) - {"version"} == {f.name for f in dataclasses.fields(Preprocessing)}
    assert pre == Preprocessing(size=224, resize="pad", mean=(0.5, 0.5, 0.5), std=(1.0, 1.0, 1.0))
    assert Preprocessing(size=224, resize="crop").describe() != described


def test_preprocessing_is_frozen() -> None:
    pre = Preprocessing(size=8)
    with pytest.raises(dataclasses.FrozenInstanceError):
        pre.size = 16  # type: ignore[misc]


@pytest.mark.parametrize(
    ("resolution", "multiple", "expected"),
    [
        (518, 14, 518),  # already valid
        (512, 14, 518),  # 504 is 8 away, 518 is 6 away
        (505, 14, 504),
        (21, 14, 28),  # tie: 14 and 28 are both 7 away, ties go up
        (10, 14, 14),  # never snaps to 0
        (500, 16, 496),
    ],
)
def test_snap_resolution_with_snap(resolution: int, multiple: int, expected: int) -> None:
    assert snap_resolution(resolution, multiple, snap=True, model_name="m") == expected


def test_snap_resolution_refuses_and_says_how() -> None:
    assert snap_resolution(224, 14, snap=False, model_name="dinov2/base") == 224
    with pytest.raises(ResolutionError) as info:
        snap_resolution(512, 14, snap=False, model_name="dinov2/base")
    assert str(info.value) == (
        "resolution 512 is not a multiple of 14 (the patch size of dinov2/base); "
        "nearest valid: 504 or 518; pass --snap-resolution to use 518"
    )
    with pytest.raises(
        ResolutionError, match="nearest valid: 14; pass --snap-resolution to use 14"
    ):
        snap_resolution(10, 14, snap=False, model_name="dinov2/base")


@pytest.mark.parametrize(("resolution", "multiple"), [(0, 14), (224, 0), (224.0, 14)])
def test_snap_resolution_rejects_nonsense(resolution: int, multiple: int) -> None:
    with pytest.raises(ResolutionError, match="Expected a positive integer"):
        snap_resolution(resolution, multiple, snap=True, model_name="m")
