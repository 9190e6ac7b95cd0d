"""Per-architecture adapters: one registered :class:`FamilyAdapter` per transformers model class.

An adapter knows the model and config class, the ``model_type`` strings of ``config.json`` it
claims, how to read the architecture facts (embed dim, patch size, registers) from a config, and how
to map the model output to :class:`Tokens`. Loading and pooling look the adapter up by name; nothing
branches over families.

Token layouts (checked by ``tests/models``):

- DINOv3 ViT, DINOv2 with registers: ``last_hidden_state = [CLS, R registers, patches]``.
- DINOv2, ViT (ImageNet-21k): ``[CLS, patches]``. ``ViTModel`` is built without its tanh pooler.
- DINOv3 ConvNeXt: ``[pooled, map tokens]``, both layer-normed.
- ConvNeXt (ImageNet-22k): ``last_hidden_state`` is ``(B, C, H, W)``, ``pooler_output`` ``(B, C)``.

Patch tokens are row-major, so ``patches`` is ``(B, h, w, D)`` with ``h = H // stride``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import torch

from embedkit.errors import ModelLoadError, UnknownModelError

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel

    from embedkit.models.registry import EncoderSpec

#: Output stride of every ConvNeXt (4x4 stem, then three 2x downsamplings).
CONVNEXT_STRIDE = 32


@dataclass(slots=True)
class Tokens:
    """The model output in one layout for every family."""

    cls: torch.Tensor | None  # (B, D) CLS token of a ViT
    pooled: torch.Tensor | None  # (B, D) pooled output of a ConvNeXt
    patches: torch.Tensor  # (B, h, w, D) patch / feature-map tokens, registers excluded


@dataclass(frozen=True, slots=True)
class ConfigFacts:
    """Architecture facts read from a transformers config."""

    embed_dim: int
    patch_size: int | None
    input_multiple: int
    num_register_tokens: int


TokensFn = Callable[[Any, "EncoderSpec", tuple[int, int]], Tokens]
FactsFn = Callable[["PretrainedConfig"], ConfigFacts]


@dataclass(frozen=True, slots=True)
class FamilyAdapter:
    """How embedkit drives one transformers architecture."""

    name: str
    model_class_name: str  # attribute of the ``transformers`` package, resolved lazily
    config_class_name: str
    model_types: tuple[str, ...]  # ``config.json`` model_type values this family claims
    stored_poolings: tuple[str, ...]  # poolings computed from the model output, in order
    tokens: TokensFn  # (model output, spec, (height, width) of the input) -> Tokens
    facts: FactsFn
    model_kwargs: Mapping[str, Any] = field(default_factory=dict)  # for __init__/from_pretrained
    forward_kwargs: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.model_types:
            raise ValueError(f"family {self.name!r} claims no model_type")
        object.__setattr__(self, "model_kwargs", MappingProxyType(dict(self.model_kwargs)))
        object.__setattr__(self, "forward_kwargs", MappingProxyType(dict(self.forward_kwargs)))

    @property
    def model_class(self) -> type[PreTrainedModel]:
        import transformers

        cls: type[PreTrainedModel] = getattr(transformers, self.model_class_name)
        return cls

    @property
    def config_class(self) -> type[PretrainedConfig]:
        import transformers

        cls: type[PretrainedConfig] = getattr(transformers, self.config_class_name)
        return cls

    def build_config(self, values: Mapping[str, object]) -> PretrainedConfig:
        values_any: dict[str, Any] = dict(values)
        return self.config_class(**values_any)

    def count_params(self, config: PretrainedConfig) -> int:
        """Parameter count of the architecture, built on the meta device (no memory, no I/O)."""
        with torch.device("meta"):
            model = self.model_class(config, **self.model_kwargs)
        return sum(p.numel() for p in model.parameters())


_FAMILIES: dict[str, FamilyAdapter] = {}


def register_family(adapter: FamilyAdapter) -> FamilyAdapter:
    """Add an adapter; a duplicate name or an already claimed model_type raises ValueError."""
    if adapter.name in _FAMILIES:
        raise ValueError(f"family {adapter.name!r} is already registered")
    claimed = {t: f.name for f in _FAMILIES.values() for t in f.model_types}
    for model_type in adapter.model_types:
        if model_type in claimed:
            raise ValueError(
                f"model_type {model_type!r} is already claimed by family {claimed[model_type]!r}"
            )
    _FAMILIES[adapter.name] = adapter
    return adapter


def get_family(name: str) -> FamilyAdapter:
    try:
        return _FAMILIES[name]
    except KeyError:
        choices = ", ".join(sorted(_FAMILIES))
        raise UnknownModelError(f"unknown model family {name!r}; choose one of {choices}") from None


def list_families() -> list[FamilyAdapter]:
    return list(_FAMILIES.values())


def supported_model_types() -> list[str]:
    return sorted(t for f in _FAMILIES.values() for t in f.model_types)


def family_for_model_type(model_type: object, *, where: str) -> FamilyAdapter:
    """The adapter claiming ``model_type`` (from ``config.json`` at ``where``)."""
    for adapter in _FAMILIES.values():
        if model_type in adapter.model_types:
            return adapter
    raise UnknownModelError(
        f"{where}: model_type {model_type!r} is not supported; embedkit supports "
        f"{', '.join(supported_model_types())}"
    )


# --- facts -------------------------------------------------------------------------------


def _int_size(value: object) -> int:
    """``patch_size`` may be an int or an (h, w) pair in transformers configs."""
    if isinstance(value, int):
        return value
    if isinstance(value, list | tuple) and len(value) == 2 and value[0] == value[1]:
        return int(value[0])
    raise ModelLoadError(f"non-square patch size {value!r} is not supported")


def _vit_facts(config: PretrainedConfig) -> ConfigFacts:
    patch = _int_size(config.patch_size)
    return ConfigFacts(
        embed_dim=int(config.hidden_size),
        patch_size=patch,
        input_multiple=patch,
        num_register_tokens=int(getattr(config, "num_register_tokens", 0)),
    )


def _convnext_facts(config: PretrainedConfig) -> ConfigFacts:
    return ConfigFacts(
        embed_dim=int(config.hidden_sizes[-1]),
        patch_size=None,
        input_multiple=CONVNEXT_STRIDE,
        num_register_tokens=0,
    )


# --- tokens ------------------------------------------------------------------------------


def _grid(spec: EncoderSpec, image_size: tuple[int, int]) -> tuple[int, int]:
    return image_size[0] // spec.feature_stride, image_size[1] // spec.feature_stride


def _as_grid(flat: torch.Tensor, grid: tuple[int, int], spec: EncoderSpec) -> torch.Tensor:
    batch, count, dim = flat.shape
    if count != grid[0] * grid[1] or dim != spec.embed_dim:
        raise ModelLoadError(
            f"{spec.name}: expected {grid[0]}x{grid[1]} tokens of width {spec.embed_dim}, "
            f"got {count} of width {dim}; the checkpoint does not match its spec "
            f"(num_register_tokens={spec.num_register_tokens}, embed_dim={spec.embed_dim})"
        )
    return flat.reshape(batch, grid[0], grid[1], dim)


def _vit_tokens(outputs: Any, spec: EncoderSpec, image_size: tuple[int, int]) -> Tokens:
    hidden: torch.Tensor = outputs.last_hidden_state
    patches = hidden[:, 1 + spec.num_register_tokens :]
    return Tokens(
        cls=hidden[:, 0], pooled=None, patches=_as_grid(patches, _grid(spec, image_size), spec)
    )


def _dinov3_convnext_tokens(outputs: Any, spec: EncoderSpec, image_size: tuple[int, int]) -> Tokens:
    hidden: torch.Tensor = outputs.last_hidden_state
    return Tokens(
        cls=None,
        pooled=hidden[:, 0],
        patches=_as_grid(hidden[:, 1:], _grid(spec, image_size), spec),
    )


def _convnext_tokens(outputs: Any, spec: EncoderSpec, image_size: tuple[int, int]) -> Tokens:
    feature_map: torch.Tensor = outputs.last_hidden_state  # (B, C, h, w)
    patches = feature_map.permute(0, 2, 3, 1)
    flat = patches.reshape(patches.shape[0], -1, patches.shape[-1])
    return Tokens(
        cls=None,
        pooled=outputs.pooler_output,
        patches=_as_grid(flat, _grid(spec, image_size), spec),
    )


VIT_POOLINGS = ("cls", "mean", "patch")
CONVNEXT_POOLINGS = ("pooled", "mean", "patch")

for _adapter in (
    FamilyAdapter(
        name="dinov3-vit",
        model_class_name="DINOv3ViTModel",
        config_class_name="DINOv3ViTConfig",
        model_types=("dinov3_vit",),
        stored_poolings=VIT_POOLINGS,
        tokens=_vit_tokens,
        facts=_vit_facts,
    ),
    FamilyAdapter(
        name="dinov3-convnext",
        model_class_name="DINOv3ConvNextModel",
        config_class_name="DINOv3ConvNextConfig",
        model_types=("dinov3_convnext",),
        stored_poolings=CONVNEXT_POOLINGS,
        tokens=_dinov3_convnext_tokens,
        facts=_convnext_facts,
    ),
    FamilyAdapter(
        name="dinov2",
        model_class_name="Dinov2Model",
        config_class_name="Dinov2Config",
        model_types=("dinov2",),
        stored_poolings=VIT_POOLINGS,
        tokens=_vit_tokens,
        facts=_vit_facts,
    ),
    FamilyAdapter(
        name="dinov2-reg",
        model_class_name="Dinov2WithRegistersModel",
        config_class_name="Dinov2WithRegistersConfig",
        model_types=("dinov2_with_registers",),
        stored_poolings=VIT_POOLINGS,
        tokens=_vit_tokens,
        facts=_vit_facts,
    ),
    FamilyAdapter(
        name="convnext",
        model_class_name="ConvNextModel",
        config_class_name="ConvNextConfig",
        model_types=("convnext",),
        stored_poolings=CONVNEXT_POOLINGS,
        tokens=_convnext_tokens,
        facts=_convnext_facts,
    ),
    FamilyAdapter(
        name="vit",
        model_class_name="ViTModel",
        config_class_name="ViTConfig",
        model_types=("vit",),
        stored_poolings=VIT_POOLINGS,
        tokens=_vit_tokens,
        facts=_vit_facts,
        # The tanh pooler of ViTModel is not the CLS token: leave it out.
        model_kwargs={"add_pooling_layer": False},
        # Learned position embeddings at 224 px: interpolate them for other resolutions.
        forward_kwargs={"interpolate_pos_encoding": True},
    ),
):
    register_family(_adapter)
