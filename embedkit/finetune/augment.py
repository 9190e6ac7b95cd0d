"""Train-time augmentation with torch ops only: horizontal flip and a small rotation.

Applied to the normalised batch (B, 3, H, W). Every random draw comes from the generator passed
in, so an epoch seeded the same way augments the same way (needed for exact resume). Training
draws the flip and angle of every image of an epoch up front (:func:`draw`), indexed by the
image's position in the epoch order, so how the epoch is cut into batches or split over
data-parallel ranks does not change any image's augmentation. Pixels rotated in from outside
the image are zeros, i.e. the dataset mean after normalisation.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["MAX_ROTATION_DEG", "apply", "augment", "draw"]

MAX_ROTATION_DEG = 10.0


def draw(
    n: int, generator: torch.Generator, *, degrees: float = MAX_ROTATION_DEG
) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` flips (bool, p = 0.5) and rotation angles (radians, U(-degrees, degrees))."""
    flip = torch.rand(n, generator=generator) < 0.5
    angles = (torch.rand(n, generator=generator) * 2 - 1) * math.radians(degrees)
    return flip, angles


def apply(pixels: torch.Tensor, flip: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Flip the images where ``flip`` is True, then rotate each by its angle."""
    n = pixels.shape[0]
    flip = flip.to(pixels.device).view(n, 1, 1, 1)
    out = torch.where(flip, pixels.flip(-1), pixels)
    cos, sin = torch.cos(angles), torch.sin(angles)
    zero = torch.zeros_like(cos)
    theta = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)
    theta = theta.to(device=pixels.device, dtype=pixels.dtype)
    grid = F.affine_grid(theta, list(out.shape), align_corners=False)
    return F.grid_sample(out, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def augment(
    pixels: torch.Tensor, generator: torch.Generator, *, degrees: float = MAX_ROTATION_DEG
) -> torch.Tensor:
    """Flip each image horizontally with p = 0.5, then rotate it by U(-degrees, degrees)."""
    flip, angles = draw(pixels.shape[0], generator, degrees=degrees)
    return apply(pixels, flip, angles)
