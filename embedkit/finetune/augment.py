"""Train-time augmentation with torch ops only: horizontal flip and a small rotation.

Applied to the normalised batch (B, 3, H, W). Every random draw comes from the generator passed
in, so an epoch seeded the same way augments the same way (needed for exact resume). Pixels
rotated in from outside the image are zeros, i.e. the dataset mean after normalisation.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["MAX_ROTATION_DEG", "augment"]

MAX_ROTATION_DEG = 10.0


def augment(
    pixels: torch.Tensor, generator: torch.Generator, *, degrees: float = MAX_ROTATION_DEG
) -> torch.Tensor:
    """Flip each image horizontally with p = 0.5, then rotate it by U(-degrees, degrees)."""
    n = pixels.shape[0]
    flip = torch.rand(n, generator=generator) < 0.5
    angles = (torch.rand(n, generator=generator) * 2 - 1) * math.radians(degrees)
    flip = flip.to(pixels.device).view(n, 1, 1, 1)
    out = torch.where(flip, pixels.flip(-1), pixels)
    cos, sin = torch.cos(angles), torch.sin(angles)
    zero = torch.zeros_like(cos)
    theta = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)
    theta = theta.to(device=pixels.device, dtype=pixels.dtype)
    grid = F.affine_grid(theta, list(out.shape), align_corners=False)
    return F.grid_sample(out, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
