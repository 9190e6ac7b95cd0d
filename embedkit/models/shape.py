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
    ``cls_token``: whether the sequence starts with a CLS token (SigLIP has none).
    ``per_image_params``: parameters used once per image rather than once per token (the query
    path and MLP of an attention-pooling head), part of ``params``.
    """

    params: int
    embed_dim: int
    layers: int
    patch: int
    registers: int = 0
    kind: ShapeKind = "vit"
    gflops_224: float | None = None
    cls_token: bool = True
    per_image_params: int = 0

    def __post_init__(self) -> None:
        for name in ("params", "embed_dim", "layers", "patch"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"ModelShape: expected a positive int {name}, got {value!r}")
        if self.kind not in ("vit", "convnet"):
            raise ValueError(f"ModelShape: expected kind 'vit' or 'convnet', got {self.kind!r}")
        if not 0 <= self.per_image_params < self.params:
            raise ValueError(
                "ModelShape: expected 0 <= per_image_params < params, got "
                f"{self.per_image_params!r} of {self.params!r}"
            )

    def tokens(self, side: int) -> int:
        """Sequence length of a ViT at ``side`` x ``side`` px (CLS + registers + patches)."""
        return (side // self.patch) ** 2 + int(self.cls_token) + self.registers
