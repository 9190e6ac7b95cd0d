"""Turn a [0, 1] image array into the normalised tensor an encoder takes.

Policy (one :class:`Preprocessing` value describes it and is part of every cache key):

* **Channels.** Grayscale (H, W) or (H, W, 1) is replicated to 3 channels; RGB is kept.
* **Geometry** (``resize``), always ending at ``size x size``:

  - ``squash``: resize to ``size x size`` ignoring the aspect ratio. This is what the Hugging Face
    DINOv2/DINOv3 image processors do when given a square ``{"height": s, "width": s}`` size.
  - ``pad``: letterbox to a square with zeros (black, before normalisation), the image centred,
    then resize.
  - ``crop``: centre-crop the largest square, then resize.

* **Resampling.** ``torch.nn.functional.interpolate`` on float32 values in [0, 1] with
  ``mode=interpolation``, ``antialias=antialias`` and ``align_corners=False`` (torchvision does
  not load beside the CPU torch we use, so this replaces its ``resize``). An image already at
  ``size x size`` is not resampled. Bicubic overshoot is clamped back to [0, 1], as uint8
  pipelines do.
* **Normalisation.** ``(x - mean) / std`` per channel (ImageNet statistics by default).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar, get_args

import numpy as np
import torch
import torch.nn.functional as F

from embedkit.data.policies import Interpolation, ResizeMode
from embedkit.errors import ResolutionError

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "Preprocessing", "snap_resolution"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_RESIZE_MODES: tuple[str, ...] = get_args(ResizeMode)
_INTERPOLATIONS: tuple[str, ...] = get_args(Interpolation)


@dataclass(frozen=True, slots=True)
class Preprocessing:
    """How an image becomes the encoder input; see the module docstring for the policy.

    Validated when built: every invalid field raises
    :class:`~embedkit.errors.ResolutionError` (a ``ValueError``).
    """

    VERSION: ClassVar[int] = 1  # bump when the numbers __call__ produces change for the same fields

    size: int
    resize: ResizeMode = "squash"
    interpolation: Interpolation = "bilinear"
    antialias: bool = True
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self) -> None:
        if isinstance(self.size, bool) or not isinstance(self.size, int) or self.size < 1:
            _invalid("size", "a positive integer number of pixels", self.size)
        if self.resize not in _RESIZE_MODES:
            _invalid("resize", f"one of {', '.join(_RESIZE_MODES)}", self.resize)
        if self.interpolation not in _INTERPOLATIONS:
            _invalid("interpolation", f"one of {', '.join(_INTERPOLATIONS)}", self.interpolation)
        if not isinstance(self.antialias, bool):
            _invalid("antialias", "a bool", self.antialias)
        for name in ("mean", "std"):
            values = getattr(self, name)
            if len(values) != 3 or not all(isinstance(v, int | float) for v in values):
                _invalid(name, "3 numbers (one per RGB channel)", values)
            # normalise ints and lists to a tuple of floats so equal settings compare equal
            object.__setattr__(self, name, tuple(float(v) for v in values))
        if not all(s > 0 for s in self.std):
            _invalid("std", "3 positive numbers", self.std)

    def __call__(self, image: np.ndarray) -> torch.Tensor:
        """Return a float32 tensor of shape (3, size, size), normalised."""
        x = _to_chw(image)
        x = _GEOMETRY[self.resize](x)
        if x.shape[-2:] != (self.size, self.size):
            x = F.interpolate(
                x.unsqueeze(0),
                size=(self.size, self.size),
                mode=self.interpolation,
                antialias=self.antialias,
                align_corners=False,
            ).squeeze(0)
            if self.interpolation == "bicubic":
                x = x.clamp_(0.0, 1.0)
        x = x.expand(3, -1, -1)  # grayscale: 1 -> 3 channels (resized once, copied after)
        mean = torch.tensor(self.mean, dtype=torch.float32).view(3, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32).view(3, 1, 1)
        return ((x - mean) / std).contiguous()

    def describe(self) -> dict[str, object]:
        """Every field as plain JSON types, plus ``version``; used in cache keys."""
        described: dict[str, object] = {"version": self.VERSION}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            described[field.name] = list(value) if isinstance(value, tuple) else value
        return described


def _invalid(name: str, expected: str, got: object) -> None:
    raise ResolutionError(f"Preprocessing.{name}: expected {expected}, got {got!r} instead")


def _to_chw(image: np.ndarray) -> torch.Tensor:
    """(H, W), (H, W, 1) or (H, W, 3) array -> float32 (C, H, W) tensor, C in {1, 3}."""
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim != 3 or image.shape[2] not in (1, 3) or 0 in image.shape:
        raise ValueError(
            f"Expected an image of shape (H, W), (H, W, 1) or (H, W, 3), got {image.shape} instead"
        )
    x = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))
    return x.permute(2, 0, 1)


def _squash(x: torch.Tensor) -> torch.Tensor:
    return x


def _pad(x: torch.Tensor) -> torch.Tensor:
    h, w = x.shape[-2:]
    side = max(h, w)
    top, left = (side - h) // 2, (side - w) // 2
    return F.pad(x, (left, side - w - left, top, side - h - top), value=0.0)


def _crop(x: torch.Tensor) -> torch.Tensor:
    h, w = x.shape[-2:]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    return x[:, top : top + side, left : left + side]


_GEOMETRY = {"squash": _squash, "pad": _pad, "crop": _crop}


def snap_resolution(resolution: int, multiple: int, snap: bool, *, model_name: str) -> int:
    """Check that ``resolution`` is a multiple of the patch size ``multiple``.

    Returns ``resolution`` when it is a multiple. Otherwise, with ``snap=True``, returns the
    nearest positive multiple (ties go up); with ``snap=False`` raises
    :class:`~embedkit.errors.ResolutionError` naming the nearest valid values.
    """
    if isinstance(multiple, bool) or not isinstance(multiple, int) or multiple < 1:
        raise ResolutionError(
            f"Expected a positive integer patch size for {model_name}, got {multiple!r} instead"
        )
    if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 1:
        raise ResolutionError(f"Expected a positive integer resolution, got {resolution!r} instead")
    if resolution % multiple == 0:
        return resolution
    below = resolution - resolution % multiple
    above = below + multiple
    nearest = above if below == 0 or resolution - below >= above - resolution else below
    if snap:
        return nearest
    valid = f"{below} or {above}" if below > 0 else str(above)
    raise ResolutionError(
        f"resolution {resolution} is not a multiple of {multiple} "
        f"(the patch size of {model_name}); nearest valid: {valid}; "
        f"pass --snap-resolution to use {nearest}"
    )
