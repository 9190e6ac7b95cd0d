"""FLOPs per image, model FLOPs utilisation (MFU) and the largest batch that fits.

FLOPs (forward, multiply-add = 2 FLOPs):

- ViT: ``2 * params * tokens + 4 * layers * tokens**2 * dim``: every weight is used once per token
  (the linear layers), plus the two ``tokens x tokens x dim`` attention matmuls per layer.
  ``tokens = (side / patch)**2 + 1 + registers`` (no 1 for SigLIP, which has no CLS token).
  Matches the published table in docs/scale-out.md within 1-7%, and timm's published MACs (x2)
  of ViT-S/16, B/16, B/32, L/16, H/14 and CLIP L/14 at 224 px within 1.5%. The weights of an
  attention-pooling head that only its one query runs through (``ModelShape.per_image_params``)
  count once.
- ConvNeXt: scales with the pixel count from its 224 px figure (``EncoderSpec.gflops_224``, else
  ``2 * 174 * params``, the ConvNeXt-B ratio 31 GFLOPs / 89M params).

The :class:`ModelShape` of an encoder comes from its family adapter
(:meth:`~embedkit.models.families.FamilyAdapter.flops_shape`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from embedkit.models.families import get_family
from embedkit.models.registry import EncoderSpec
from embedkit.models.shape import ModelShape

__all__ = [
    "PEAK_BF16_TFLOPS",
    "ModelShape",
    "ThroughputReport",
    "device_peak_tflops",
    "flops_per_image",
    "is_oom",
    "largest_batch",
    "peak_tflops",
    "shape_from_config",
    "shape_from_spec",
]

#: Dense bf16 tensor-core peak, TFLOP/s (vendor datasheets, no sparsity).
PEAK_BF16_TFLOPS: dict[str, float] = {
    "H200": 989.0,
    "H100 SXM": 989.0,
    "H100 PCIE": 756.0,
    "H100 NVL": 835.0,
    "H100": 989.0,
    "GH200": 989.0,
    "B200": 2250.0,
    "A100": 312.0,
    "A800": 312.0,
    "L40S": 362.0,
    "L40": 181.0,
    "L4": 121.0,
    "A10G": 70.0,
    "A10": 125.0,
    "RTX 6000 ADA": 364.0,
    "RTX 4090": 165.0,
    "RTX 3090": 71.0,
    "V100": 125.0,  # fp16 (no bf16 on Volta)
    "T4": 65.0,  # fp16
}
#: ConvNeXt-B: 31 GFLOPs at 224 px for 89M parameters.
_CONVNEXT_FLOPS_PER_PARAM_224 = 31.0e9 / 89e6


def shape_from_config(spec: EncoderSpec, config: Mapping[str, object]) -> ModelShape:
    """The :class:`ModelShape` of ``spec`` from its checkpoint's ``config.json`` (as a dict)."""
    return get_family(spec.family).flops_shape(spec, config)


def shape_from_spec(spec: EncoderSpec) -> ModelShape:
    """A :class:`ModelShape` from registry facts alone (no config.json needed), for planning.

    The family adapter knows its layout (a ViT's depth from its width, following the standard
    S/B/L/H/g layouts); use :func:`shape_from_config` when the checkpoint's config is at hand.
    """
    return get_family(spec.family).flops_shape(spec)


def flops_per_image(shape: ModelShape, side: int) -> float:
    """Forward FLOPs for one ``side`` x ``side`` image."""
    if shape.kind == "convnet":
        base = (
            shape.gflops_224 * 1e9
            if shape.gflops_224
            else shape.params * _CONVNEXT_FLOPS_PER_PARAM_224
        )
        return base * (side / 224) ** 2
    t = shape.tokens(side)
    per_token = shape.params - shape.per_image_params
    return (
        2.0 * per_token * t
        + 2.0 * shape.per_image_params
        + 4.0 * shape.layers * t * t * shape.embed_dim
    )


def peak_tflops(device_name: str) -> float | None:
    """Dense bf16 peak of a GPU by its ``torch.cuda.get_device_name``; None when unknown."""
    name = device_name.upper().replace("NVIDIA", "").replace("GEFORCE", "").strip()
    for key in sorted(PEAK_BF16_TFLOPS, key=len, reverse=True):  # "H100 SXM" before "H100"
        if key in name:
            return PEAK_BF16_TFLOPS[key]
    return None


def device_peak_tflops(device: torch.device) -> tuple[str, float | None]:
    """(device name, peak bf16 TFLOP/s or None) for this device; CPUs have no table entry."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return name, peak_tflops(name)
    return device.type, None


@dataclass(frozen=True, slots=True)
class ThroughputReport:
    """Images/s, achieved TFLOP/s and MFU of an extraction (all ranks together)."""

    images: int
    seconds: float
    flops_per_image: float
    devices: int
    device_name: str
    peak_tflops_per_device: float | None

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0

    @property
    def tflops(self) -> float:
        """Achieved TFLOP/s over all devices."""
        return self.images_per_s * self.flops_per_image / 1e12

    @property
    def mfu(self) -> float | None:
        """Achieved / peak FLOP/s over all devices; None for an unknown device."""
        if self.peak_tflops_per_device is None:
            return None
        return self.tflops / (self.peak_tflops_per_device * self.devices)

    def render(self) -> str:
        per = self.flops_per_image
        size = f"{per / 1e12:.2f} TFLOPs" if per >= 1e12 else f"{per / 1e9:.1f} GFLOPs"
        text = (
            f"{self.images_per_s:.1f} img/s on {self.devices} x {self.device_name}, "
            f"{size}/image, {self.tflops:.3f} TFLOP/s achieved"
        )
        if self.mfu is None:
            return text + " (MFU: no peak figure for this device)"
        return text + f", MFU {100 * self.mfu:.1f}% of {self.peak_tflops_per_device:g} TFLOP/s"


def is_oom(exc: BaseException) -> bool:
    """A CUDA (or other accelerator) out-of-memory error."""
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def largest_batch(try_batch: Callable[[int], None], *, start: int, limit: int = 4096) -> int:
    """The largest batch size ``<= limit`` for which ``try_batch(n)`` does not run out of memory.

    Doubles from ``start`` until an OOM (or ``limit``), then bisects between the last success
    and the failure. An OOM at ``start`` halves down to 1; OOM at 1 re-raises. Non-OOM errors
    propagate. ``try_batch`` should run one forward of the real shape and free its memory.
    """
    if start < 1 or limit < 1:
        raise ValueError(f"Expected start, limit >= 1, got {start}, {limit} instead")
    good, bad = 0, 0  # bad == 0: no OOM seen yet
    n = min(start, limit)
    while True:
        try:
            try_batch(n)
        except Exception as exc:
            if not is_oom(exc) or n == 1:
                raise
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            bad = n
        else:
            good = n
            if n >= limit:
                return n
        if not bad:
            n = min(2 * n, limit)
        elif not good:
            n = max(1, bad // 2)
        elif bad - good <= max(1, good // 8):
            return good
        else:
            n = (good + bad) // 2
