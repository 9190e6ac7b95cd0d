"""The closed option sets of the data layer, without torch: the CLI and requests read them here.

:mod:`embedkit.data.transforms`, :mod:`embedkit.data.dataset` and :mod:`embedkit.data.volumes`
interpret them (and re-export them under these names).
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Literal

__all__ = ["CT_WINDOWS", "Interpolation", "OnBadImage", "ResizeMode", "SliceAxis"]

#: How an image becomes ``size x size``: resize ignoring aspect, letterbox, or centre-crop.
ResizeMode = Literal["squash", "pad", "crop"]
#: Resampling of :func:`torch.nn.functional.interpolate`.
Interpolation = Literal["bilinear", "bicubic"]
#: What a bad image does to an extraction: stop it, or skip the image and record it.
OnBadImage = Literal["fail", "skip"]
#: The anatomical axis a volume is cut along into 2D slices, after reorientation to RAS:
#: sagittal = axis 0 (R), coronal = axis 1 (A), axial = axis 2 (S).
SliceAxis = Literal["axial", "coronal", "sagittal"]

#: Named CT windows as (level, width) in Hounsfield units. Values from Radiopaedia, "Windowing
#: (CT)" (https://radiopaedia.org/articles/windowing-ct): brain W:80 L:40, lungs W:1500 L:-600,
#: mediastinum W:350 L:50, abdomen soft tissues W:400 L:50, bones W:1800 L:400.
CT_WINDOWS: Mapping[str, tuple[float, float]] = MappingProxyType(
    {
        "brain": (40.0, 80.0),
        "lung": (-600.0, 1500.0),
        "mediastinum": (50.0, 350.0),
        "abdomen": (50.0, 400.0),
        "bone": (400.0, 1800.0),
    }
)
