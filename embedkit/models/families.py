"""Per-architecture adapters: one registered :class:`FamilyAdapter` per transformers model class.

An adapter holds everything embedkit knows about one encoder family, so that adding a family
touches its adapter here and its registry entries (:mod:`embedkit.models.catalog`) only:

- the model and config class, and the ``model_type`` strings of ``config.json`` it claims;
- how to read the architecture facts (embed dim, patch size, registers) from a config;
- how to map the model output to :class:`Tokens`, and which poolings one forward pass stores;
- the LoRA target modules (:attr:`FamilyAdapter.lora_targets`);
- where its repeated blocks are (:meth:`FamilyAdapter.blocks`: the units FSDP shards one by one,
  and the depth of layer-wise lr decay, :meth:`FamilyAdapter.layer_ids`);
- the shape FLOPs and memory planning use (:meth:`FamilyAdapter.flops_shape`).

Loading, pooling, sharding, throughput and finetuning look the adapter up by name; nothing
branches over families.

Token layouts (checked by ``tests/models``):

- DINOv3 ViT, DINOv2 with registers: ``last_hidden_state = [CLS, R registers, patches]``.
- DINOv2, ViT (ImageNet-21k): ``[CLS, patches]``. ``ViTModel`` is built without its tanh pooler.
- DINOv3 ConvNeXt: ``[pooled, map tokens]``, both layer-normed.
- ConvNeXt (ImageNet-22k): ``last_hidden_state`` is ``(B, C, H, W)``, ``pooler_output`` ``(B, C)``.
- MAE (``ViTMAEModel``): ``[CLS, kept patches in shuffled order]``, layer-normed. embedkit sets
  ``mask_ratio = 0`` on every loaded model (:attr:`FamilyAdapter.config_overrides`, so no patch is
  dropped), passes increasing ``noise`` (:attr:`FamilyAdapter.extra_inputs`, so the "shuffle" is
  the identity) and still puts the tokens back in place with the ``ids_restore`` the model returns
  (a forward without that noise, e.g. in finetuning, is shuffled at random).
- CLIP (``CLIPVisionModel``): ``[CLS, patches]`` from the last block *before* the final
  LayerNorm; ``pooler_output = post_layernorm(CLS)`` is CLIP's image feature (what its
  projection maps into the joint space), so ``cls`` is the pooler output, not ``hidden[:, 0]``.
- SigLIP (``SiglipVisionModel``): ``[patches]``, no CLS token, layer-normed; ``pooler_output`` is
  the attention-pooling (MAP) head over them, stored as ``pooled``.

Patch tokens are row-major, so ``patches`` is ``(B, h, w, D)`` with ``h = H // stride``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from embedkit.errors import ConfigError, ModelLoadError, UnknownModelError
from embedkit.models.shape import ModelShape

if TYPE_CHECKING:
    import torch
    from transformers import PretrainedConfig, PreTrainedModel

    from embedkit.models.registry import EncoderSpec

#: Output stride of every ConvNeXt (4x4 stem, then three 2x downsamplings).
CONVNEXT_STRIDE = 32
#: Stride of the ConvNeXt stem (the first stage runs at 1/4 of the input side).
CONVNEXT_STEM = 4


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
#: (pixels, spec) -> extra keyword inputs of the model's forward that depend on the batch
InputsFn = Callable[["torch.Tensor", "EncoderSpec"], Mapping[str, Any]]
FactsFn = Callable[["PretrainedConfig"], ConfigFacts]
#: (spec, the checkpoint's config.json as a dict or None) -> the shape FLOPs are computed from
ShapeFn = Callable[["EncoderSpec", "Mapping[str, object] | None"], ModelShape]


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
    shape: ShapeFn  # see flops_shape
    #: ``nn.Linear`` module names that LoRA adapts by default (``--lora-targets`` overrides).
    lora_targets: tuple[str, ...]
    #: Dotted path of the ``ModuleList`` of repeated blocks in the model; a ``*`` part stands for
    #: every child (``model.stages.*.layers``: the blocks of every ConvNeXt stage, in order).
    blocks_at: str
    #: Module holding the patch / position embeddings (layer id 0 of layer-wise lr decay); None
    #: when the family has no layer-wise lr decay (its blocks are not one depth-ordered stack).
    embeddings_at: str | None = None
    #: Convolutional families run faster in the channels-last memory format on a GPU.
    channels_last: bool = False
    model_kwargs: Mapping[str, Any] = field(default_factory=dict)  # for __init__/from_pretrained
    forward_kwargs: Mapping[str, Any] = field(default_factory=dict)
    #: Config attributes set on every loaded model whatever its checkpoint says: settings for
    #: frozen-feature use (MAE: ``mask_ratio = 0``, every patch kept). See :meth:`for_inference`.
    config_overrides: Mapping[str, Any] = field(default_factory=dict)
    #: Forward inputs computed from each batch (MAE: the noise that keeps patches in order).
    extra_inputs: InputsFn | None = None

    def __post_init__(self) -> None:
        if not self.model_types:
            raise ValueError(f"family {self.name!r} claims no model_type")
        if not self.lora_targets:
            raise ValueError(f"family {self.name!r} declares no LoRA target modules")
        if not self.blocks_at:
            raise ValueError(f"family {self.name!r} declares no blocks")
        object.__setattr__(self, "model_kwargs", MappingProxyType(dict(self.model_kwargs)))
        object.__setattr__(self, "forward_kwargs", MappingProxyType(dict(self.forward_kwargs)))
        object.__setattr__(self, "config_overrides", MappingProxyType(dict(self.config_overrides)))

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

    def for_inference(self, config: PretrainedConfig) -> PretrainedConfig:
        """``config`` with :attr:`config_overrides` set (in place); every loading path builds
        the model from it."""
        for key, value in self.config_overrides.items():
            if not hasattr(config, key):
                raise ModelLoadError(
                    f"family {self.name!r}: {type(config).__name__} has no {key!r} "
                    "(the adapter's config_overrides do not fit this transformers version)"
                )
            setattr(config, key, value)
        return config

    def forward(self, model: torch.nn.Module, pixels: torch.Tensor, spec: EncoderSpec) -> Any:
        """One forward pass of ``model`` over normalised ``pixels`` with the family's inputs."""
        kwargs = dict(self.forward_kwargs)
        if self.extra_inputs is not None:
            kwargs.update(self.extra_inputs(pixels, spec))
        return model(pixel_values=pixels, **kwargs)

    def count_params(self, config: PretrainedConfig) -> int:
        """Parameter count of the architecture, built on the meta device (no memory, no I/O)."""
        import torch

        with torch.device("meta"):
            model = self.model_class(config, **self.model_kwargs)
        return sum(p.numel() for p in model.parameters())

    @property
    def supports_layer_decay(self) -> bool:
        """Whether layer-wise lr decay applies (the family declares its embeddings)."""
        return self.embeddings_at is not None

    def blocks(self, model: torch.nn.Module) -> list[torch.nn.Module]:
        """The repeated blocks of ``model``, input to output: the units FSDP shards one at a
        time and the layers of layer-wise lr decay (transformer blocks of a ViT; the blocks of
        every stage of a ConvNeXt)."""
        lists: list[torch.nn.Module] = [model]
        for part in self.blocks_at.split("."):
            if part == "*":
                lists = [child for parent in lists for child in parent.children()]
                continue
            try:
                lists = [parent.get_submodule(part) for parent in lists]
            except AttributeError:
                raise ModelLoadError(
                    f"family {self.name!r}: {type(model).__name__} has no {self.blocks_at!r} "
                    "(the adapter's blocks_at does not fit this transformers version)"
                ) from None
        found = [block for blocks in lists for block in blocks.children()]
        if not found:
            raise ModelLoadError(
                f"family {self.name!r}: {type(model).__name__}.{self.blocks_at} holds no blocks"
            )
        return found

    def layer_ids(self, model: torch.nn.Module) -> dict[str, int]:
        """Layer id of every parameter of ``model`` for layer-wise lr decay: 0 for the
        embeddings, ``i + 1`` for parameters of block ``i``, ``len(blocks) + 1`` for the rest
        (final norm). A family without layer-wise decay raises :class:`ConfigError`."""
        if self.embeddings_at is None:
            raise ConfigError(
                f"layer-wise lr decay applies to ViT families; family {self.name!r} has no "
                "depth-ordered blocks (use --layer-decay 1.0)"
            )
        blocks = self.blocks(model)
        ids = {name: len(blocks) + 1 for name, _ in model.named_parameters()}
        by_param = {id(p): 0 for p in model.get_submodule(self.embeddings_at).parameters()}
        for i, block in enumerate(blocks):
            by_param.update({id(p): i + 1 for p in block.parameters()})
        for name, param in model.named_parameters():
            ids[name] = by_param.get(id(param), ids[name])
        return ids

    def flops_shape(
        self, spec: EncoderSpec, config: Mapping[str, object] | None = None
    ) -> ModelShape:
        """The :class:`ModelShape` FLOPs and memory planning use: from the checkpoint's
        ``config.json`` (as a dict) when at hand, else from registry facts alone (planning)."""
        return self.shape(spec, config)


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


def vit_facts(config: PretrainedConfig) -> ConfigFacts:
    patch = _int_size(config.patch_size)
    return ConfigFacts(
        embed_dim=int(config.hidden_size),
        patch_size=patch,
        input_multiple=patch,
        num_register_tokens=int(getattr(config, "num_register_tokens", 0)),
    )


def convnext_facts(config: PretrainedConfig) -> ConfigFacts:
    return ConfigFacts(
        embed_dim=int(config.hidden_sizes[-1]),
        patch_size=None,
        input_multiple=CONVNEXT_STRIDE,
        num_register_tokens=0,
    )


# --- shapes (FLOPs) ------------------------------------------------------------------------

#: Transformer depth by width for the registry's ViTs (S/B: 12, L: 24, H+: 32, g/7B: 40); the
#: planning guess when no config.json is at hand.
_VIT_LAYERS_BY_DIM = {384: 12, 768: 12, 1024: 24, 1280: 32, 1536: 40, 4096: 40}


def _config_int(config: Mapping[str, object], key: str, default: int) -> int:
    value = config.get(key, default)
    return int(value) if isinstance(value, int | float) else default


def vit_shape(spec: EncoderSpec, config: Mapping[str, object] | None) -> ModelShape:
    if spec.patch_size is None:
        raise ModelLoadError(f"{spec.name}: a ViT spec needs a patch_size")
    tower = config.get("vision_config") if config is not None else None
    if isinstance(tower, Mapping):  # an image-text checkpoint (CLIP, SigLIP): its vision tower
        config = tower
    if config is None:  # the family follows the standard S/B/L/H/g layouts
        layers = _VIT_LAYERS_BY_DIM.get(spec.embed_dim, 12)
    else:
        layers = _config_int(config, "num_hidden_layers", 12)
    return ModelShape(
        spec.params,
        spec.embed_dim,
        layers,
        spec.patch_size,
        spec.num_register_tokens,
        "vit",
        spec.gflops_224,
    )


def siglip_shape(spec: EncoderSpec, config: Mapping[str, object] | None) -> ModelShape:
    """A ViT without a CLS token, with an attention-pooling (MAP) head whose query path and MLP
    run once per image (its key and value projections run on every token)."""
    base = vit_shape(spec, config)
    tower = config.get("vision_config") if config is not None else None
    if isinstance(tower, Mapping):
        config = tower
    dim = spec.embed_dim
    mlp = _config_int(config, "intermediate_size", 4 * dim) if config is not None else 4 * dim
    # query and output projections, probe, LayerNorm, MLP (fc1 + fc2)
    head = 2 * (dim * dim + dim) + dim + 2 * dim + (2 * dim * mlp + mlp + dim)
    return dataclasses.replace(base, cls_token=False, per_image_params=head)


def convnext_shape(spec: EncoderSpec, config: Mapping[str, object] | None) -> ModelShape:
    """Stages of blocks after a 4x4 stem; ``embed_dim`` is the first stage's width."""
    depths = config.get("depths") if config is not None else None
    sizes = config.get("hidden_sizes") if config is not None else None
    layers = sum(int(d) for d in depths) if isinstance(depths, list) else 1
    first = int(sizes[0]) if isinstance(sizes, list) and sizes else spec.embed_dim
    return ModelShape(spec.params, first, layers, CONVNEXT_STEM, 0, "convnet", spec.gflops_224)


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


def vit_tokens(outputs: Any, spec: EncoderSpec, image_size: tuple[int, int]) -> Tokens:
    hidden: torch.Tensor = outputs.last_hidden_state
    patches = hidden[:, 1 + spec.num_register_tokens :]
    return Tokens(
        cls=hidden[:, 0], pooled=None, patches=_as_grid(patches, _grid(spec, image_size), spec)
    )


def dinov3_convnext_tokens(outputs: Any, spec: EncoderSpec, image_size: tuple[int, int]) -> Tokens:
    hidden: torch.Tensor = outputs.last_hidden_state
    return Tokens(
        cls=None,
        pooled=hidden[:, 0],
        patches=_as_grid(hidden[:, 1:], _grid(spec, image_size), spec),
    )


def convnext_tokens(outputs: Any, spec: EncoderSpec, image_size: tuple[int, int]) -> Tokens:
    feature_map: torch.Tensor = outputs.last_hidden_state  # (B, C, h, w)
    patches = feature_map.permute(0, 2, 3, 1)
    flat = patches.reshape(patches.shape[0], -1, patches.shape[-1])
    return Tokens(
        cls=None,
        pooled=outputs.pooler_output,
        patches=_as_grid(flat, _grid(spec, image_size), spec),
    )


def mae_tokens(outputs: Any, spec: EncoderSpec, image_size: tuple[int, int]) -> Tokens:
    """``[CLS, patches in the shuffled order]``: put the patches back with ``ids_restore``
    (``restore[b, i]`` is where original patch ``i`` sits in the shuffled sequence)."""
    hidden: torch.Tensor = outputs.last_hidden_state
    shuffled = hidden[:, 1:]
    restore: torch.Tensor = outputs.ids_restore
    if restore.shape[1] != shuffled.shape[1] or bool(outputs.mask.any()):
        raise ModelLoadError(
            f"{spec.name}: the MAE encoder kept {shuffled.shape[1]} of {restore.shape[1]} "
            "patches; frozen features need every patch (load the model through embedkit, "
            "which sets mask_ratio = 0)"
        )
    index = restore.to(shuffled.device).unsqueeze(-1).expand(-1, -1, shuffled.shape[-1])
    patches = shuffled.gather(1, index)
    return Tokens(
        cls=hidden[:, 0], pooled=None, patches=_as_grid(patches, _grid(spec, image_size), spec)
    )


def mae_ordered_noise(pixels: torch.Tensor, spec: EncoderSpec) -> dict[str, torch.Tensor]:
    """MAE shuffles patches by ``argsort(noise)``: increasing noise keeps them in place."""
    import torch

    h, w = _grid(spec, (int(pixels.shape[2]), int(pixels.shape[3])))
    order = torch.arange(h * w, device=pixels.device, dtype=torch.float32)
    return {"noise": order.expand(pixels.shape[0], -1)}


def clip_tokens(outputs: Any, spec: EncoderSpec, image_size: tuple[int, int]) -> Tokens:
    """CLS is CLIP's pooler output (``post_layernorm`` of the CLS token); the patch tokens are
    the last block's output, which CLIPVisionModel does not layer-norm."""
    hidden: torch.Tensor = outputs.last_hidden_state
    return Tokens(
        cls=outputs.pooler_output,
        pooled=None,
        patches=_as_grid(hidden[:, 1:], _grid(spec, image_size), spec),
    )


def siglip_tokens(outputs: Any, spec: EncoderSpec, image_size: tuple[int, int]) -> Tokens:
    """No CLS token: every token is a patch; ``pooled`` is the attention-pooling head."""
    hidden: torch.Tensor = outputs.last_hidden_state
    return Tokens(
        cls=None,
        pooled=outputs.pooler_output,
        patches=_as_grid(hidden, _grid(spec, image_size), spec),
    )


VIT_POOLINGS = ("cls", "mean", "patch")
CONVNEXT_POOLINGS = ("pooled", "mean", "patch")
#: LoRA on the query and value projections (transformers 5 module names); ConvNeXt families
#: adapt the two pointwise (linear) layers of each block instead.
VIT_LORA_TARGETS = ("q_proj", "v_proj")

for _adapter in (
    FamilyAdapter(
        name="dinov3-vit",
        model_class_name="DINOv3ViTModel",
        config_class_name="DINOv3ViTConfig",
        model_types=("dinov3_vit",),
        stored_poolings=VIT_POOLINGS,
        tokens=vit_tokens,
        facts=vit_facts,
        shape=vit_shape,
        lora_targets=VIT_LORA_TARGETS,
        blocks_at="model.layer",
        embeddings_at="embeddings",
    ),
    FamilyAdapter(
        name="dinov3-convnext",
        model_class_name="DINOv3ConvNextModel",
        config_class_name="DINOv3ConvNextConfig",
        model_types=("dinov3_convnext",),
        stored_poolings=CONVNEXT_POOLINGS,
        tokens=dinov3_convnext_tokens,
        facts=convnext_facts,
        shape=convnext_shape,
        lora_targets=("pointwise_conv1", "pointwise_conv2"),
        blocks_at="model.stages.*.layers",
        channels_last=True,
    ),
    FamilyAdapter(
        name="dinov2",
        model_class_name="Dinov2Model",
        config_class_name="Dinov2Config",
        model_types=("dinov2",),
        stored_poolings=VIT_POOLINGS,
        tokens=vit_tokens,
        facts=vit_facts,
        shape=vit_shape,
        lora_targets=VIT_LORA_TARGETS,
        blocks_at="encoder.layer",
        embeddings_at="embeddings",
    ),
    FamilyAdapter(
        name="dinov2-reg",
        model_class_name="Dinov2WithRegistersModel",
        config_class_name="Dinov2WithRegistersConfig",
        model_types=("dinov2_with_registers",),
        stored_poolings=VIT_POOLINGS,
        tokens=vit_tokens,
        facts=vit_facts,
        shape=vit_shape,
        lora_targets=VIT_LORA_TARGETS,
        blocks_at="encoder.layer",
        embeddings_at="embeddings",
    ),
    FamilyAdapter(
        name="convnext",
        model_class_name="ConvNextModel",
        config_class_name="ConvNextConfig",
        model_types=("convnext",),
        stored_poolings=CONVNEXT_POOLINGS,
        tokens=convnext_tokens,
        facts=convnext_facts,
        shape=convnext_shape,
        lora_targets=("pwconv1", "pwconv2"),
        blocks_at="encoder.stages.*.layers",
        channels_last=True,
    ),
    FamilyAdapter(
        name="vit",
        model_class_name="ViTModel",
        config_class_name="ViTConfig",
        model_types=("vit",),
        stored_poolings=VIT_POOLINGS,
        tokens=vit_tokens,
        facts=vit_facts,
        shape=vit_shape,
        lora_targets=VIT_LORA_TARGETS,
        blocks_at="layers",
        embeddings_at="embeddings",
        # The tanh pooler of ViTModel is not the CLS token: leave it out.
        model_kwargs={"add_pooling_layer": False},
        # Learned position embeddings at 224 px: interpolate them for other resolutions.
        forward_kwargs={"interpolate_pos_encoding": True},
    ),
    # Self-supervised: masked autoencoder (MAE); its encoder without masking.
    FamilyAdapter(
        name="vit-mae",
        model_class_name="ViTMAEModel",
        config_class_name="ViTMAEConfig",
        model_types=("vit_mae",),
        stored_poolings=VIT_POOLINGS,
        tokens=mae_tokens,
        facts=vit_facts,
        shape=vit_shape,
        lora_targets=VIT_LORA_TARGETS,
        blocks_at="layers",
        embeddings_at="embeddings",
        # Fixed 2D sin-cos position embeddings at 224 px, interpolated for other resolutions.
        forward_kwargs={"interpolate_pos_encoding": True},
        config_overrides={"mask_ratio": 0.0},
        extra_inputs=mae_ordered_noise,
    ),
    # Weakly supervised (image-text): the vision towers of CLIP and SigLIP. Hub checkpoints hold
    # the whole image-text model (model_type "clip" / "siglip"); the vision model loads its part.
    FamilyAdapter(
        name="clip",
        model_class_name="CLIPVisionModel",
        config_class_name="CLIPVisionConfig",
        model_types=("clip", "clip_vision_model"),
        stored_poolings=VIT_POOLINGS,
        tokens=clip_tokens,
        facts=vit_facts,
        shape=vit_shape,
        lora_targets=VIT_LORA_TARGETS,
        blocks_at="encoder.layers",
        embeddings_at="embeddings",
        forward_kwargs={"interpolate_pos_encoding": True},
    ),
    FamilyAdapter(
        name="siglip",
        model_class_name="SiglipVisionModel",
        config_class_name="SiglipVisionConfig",
        model_types=("siglip", "siglip_vision_model"),
        stored_poolings=CONVNEXT_POOLINGS,  # no CLS token: the pooler output, as a ConvNeXt
        tokens=siglip_tokens,
        facts=vit_facts,
        shape=siglip_shape,
        lora_targets=VIT_LORA_TARGETS,
        blocks_at="encoder.layers",
        embeddings_at="embeddings",
        forward_kwargs={"interpolate_pos_encoding": True},
    ),
):
    register_family(_adapter)
