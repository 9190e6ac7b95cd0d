"""The closed option sets of the data layer, without torch: the CLI and requests read them here.

:mod:`embedkit.data.transforms` and :mod:`embedkit.data.dataset` interpret them (and re-export
them under these names).
"""

from __future__ import annotations

from typing import Literal

__all__ = ["Interpolation", "OnBadImage", "ResizeMode"]

#: How an image becomes ``size x size``: resize ignoring aspect, letterbox, or centre-crop.
ResizeMode = Literal["squash", "pad", "crop"]
#: Resampling of :func:`torch.nn.functional.interpolate`.
Interpolation = Literal["bilinear", "bicubic"]
#: What a bad image does to an extraction: stop it, or skip the image and record it.
OnBadImage = Literal["fail", "skip"]
