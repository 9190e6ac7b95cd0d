"""The architecture numbers that FLOPs and memory planning depend on.

A family adapter (:meth:`~embedkit.models.families.FamilyAdapter.flops_shape`) turns a registry
spec, and the checkpoint's ``config.json`` when at hand, into a :class:`ModelShape`;
:mod:`embedkit.models.throughput` and :mod:`embedkit.models.sharding` compute from it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

ShapeKind = Literal["vit", "convnet"]


@dataclass(frozen=True, slots=True)
class ModelShape:
    """The architecture numbers that FLOPs and memory depend on.

    ``patch``: the ViT patch size, or the stem stride (4) for a ConvNeXt; ``kind`` says which.
    ``layers``: the transformer blocks of a ViT, the blocks of all stages of a ConvNeXt.
    """

    params: int
    embed_dim: int
    layers: int
    patch: int
    registers: int = 0
    kind: ShapeKind = "vit"
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
