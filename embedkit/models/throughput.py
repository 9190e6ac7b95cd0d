"""FLOPs per image, model FLOPs utilisation (MFU) and the largest batch that fits.

FLOPs (forward, multiply-add = 2 FLOPs):

- ViT: ``2 * params * tokens + 4 * layers * tokens**2 * dim``: every weight is used once per token
  (the linear layers), plus the two ``tokens x tokens x dim`` attention matmuls per layer.
  ``tokens = (side / patch)**2 + 1 + registers``. Matches the PROTOCOLS.md table within 1-7%.
- ConvNeXt: scales with the pixel count from its 224 px figure (``EncoderSpec.gflops_224``, else
  ``2 * 174 * params``, the ConvNeXt-B ratio 31 GFLOPs / 89M params).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from embedkit.models.registry import EncoderSpec

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


@dataclass(frozen=True, slots=True)
class ModelShape:
    """The architecture numbers that FLOPs and memory depend on.

    ``patch``: the ViT patch size, or the stem stride (4) for a ConvNeXt; ``kind`` says which.
    """

    params: int
    embed_dim: int
    layers: int
    patch: int
    registers: int = 0
    kind: str = "vit"  # "vit" or "convnet"
    gflops_224: float | None = None

    def __post_init__(self) -> None:
        for name in ("params", "embed_dim", "layers", "patch"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"ModelShape: expected a positive int {name}, got {value!r}")
        if self.kind not in ("vit", "convnet"):
            raise ValueError(f"ModelShape: expected kind 'vit' or 'convnet', got {self.kind!r}")

    def tokens(self, side: int) -> int:
        """Sequence length of a ViT at ``side`` x ``side`` px (CLS + registers + patches)."""
        return (side // self.patch) ** 2 + 1 + self.registers

    @classmethod
    def from_config(cls, spec: EncoderSpec, config: Mapping[str, object]) -> ModelShape:
        """From a registry spec and its checkpoint's ``config.json`` (as a dict)."""

        def num(key: str, default: int) -> int:
            value = config.get(key, default)
            return int(value) if isinstance(value, int | float) else default

        if spec.patch_size is None:  # ConvNeXt: stages of blocks after a 4x4 stem
            depths = config.get("depths")
            sizes = config.get("hidden_sizes")
            layers = sum(int(d) for d in depths) if isinstance(depths, list) else 1
            first = int(sizes[0]) if isinstance(sizes, list) and sizes else spec.embed_dim
            return cls(spec.params, first, layers, 4, 0, "convnet", spec.gflops_224)
        return cls(
            spec.params,
            spec.embed_dim,
            num("num_hidden_layers", 12),
            spec.patch_size,
            spec.num_register_tokens,
            "vit",
            spec.gflops_224,
        )


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
    return 2.0 * shape.params * t + 4.0 * shape.layers * t * t * shape.embed_dim


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


#: Transformer depth by width for the registry's ViTs (S/B: 12, L: 24, H+: 32, g/7B: 40).
_VIT_LAYERS_BY_DIM = {384: 12, 768: 12, 1024: 24, 1280: 32, 1536: 40, 4096: 40}


def shape_from_spec(spec: EncoderSpec) -> ModelShape:
    """A :class:`ModelShape` from registry facts alone (no config.json needed), for planning.

    ViT depth comes from the width (the registry's families follow the standard S/B/L/H/g
    layouts); use :meth:`ModelShape.from_config` when the checkpoint's config is at hand.
    """
    if spec.patch_size is None:
        return ModelShape(spec.params, spec.embed_dim, 1, 4, 0, "convnet", spec.gflops_224)
    layers = _VIT_LAYERS_BY_DIM.get(spec.embed_dim, 12)
    return ModelShape(
        spec.params, spec.embed_dim, layers, spec.patch_size, spec.num_register_tokens
    )
