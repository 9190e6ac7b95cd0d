"""Every registered family adapter answers each per-family fact on a tiny random model of it.

Adding an encoder family touches its adapter (``embedkit/models/families.py``) and its registry
entries (``embedkit/models/catalog.py``, including a ``test/tiny-*`` entry): these tests then run
on it. Facts: LoRA targets, the repeated blocks (FSDP units, layer-decay depth), layer ids, the
FLOPs shape.
"""

from __future__ import annotations

import pytest
import torch
from transformers import PreTrainedModel

from embedkit.errors import ConfigError, ModelLoadError
from embedkit.models import (
    EncoderSpec,
    FamilyAdapter,
    get_family,
    get_spec,
    list_families,
    list_specs,
)
from embedkit.models.throughput import flops_per_image, shape_from_config, shape_from_spec

FAMILIES = [family.name for family in list_families()]


def _tiny(family: str) -> tuple[FamilyAdapter, EncoderSpec, PreTrainedModel]:
    adapter = get_family(family)
    spec = next(s for s in list_specs() if s.family == family and s.tiny_config is not None)
    assert spec.tiny_config is not None
    torch.manual_seed(0)
    model = adapter.model_class(adapter.build_config(spec.tiny_config), **adapter.model_kwargs)
    return adapter, spec, model


def _config(model: PreTrainedModel) -> dict[str, object]:
    as_dict: dict[str, object] = model.config.to_dict()
    return as_dict


def test_every_family_has_a_tiny_registry_entry() -> None:
    tiny = {s.family for s in list_specs() if s.tiny_config is not None}
    assert set(FAMILIES) <= tiny


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_targets_name_linear_layers_of_every_block(family: str) -> None:
    adapter, _, model = _tiny(family)
    blocks = adapter.blocks(model)
    for target in adapter.lora_targets:
        for block in blocks:
            hits = [m for n, m in block.named_modules() if n.rsplit(".", 1)[-1] == target]
            assert hits, f"{family}: no {target!r} in a block"
            assert all(isinstance(m, torch.nn.Linear) for m in hits), (family, target)


@pytest.mark.parametrize("family", FAMILIES)
def test_channels_last_is_declared_by_the_convolutional_families(family: str) -> None:
    """The channels-last memory format (used on GPUs) pays off where the blocks convolve."""
    adapter, _, model = _tiny(family)
    convolves = any(
        isinstance(m, torch.nn.Conv2d) and m.kernel_size != (1, 1)
        for block in adapter.blocks(model)
        for m in block.modules()
    )
    assert adapter.channels_last == convolves, family


@pytest.mark.parametrize("family", FAMILIES)
def test_blocks_are_the_repeated_blocks_in_order(family: str) -> None:
    adapter, spec, model = _tiny(family)
    blocks = adapter.blocks(model)
    # as many blocks as the FLOPs shape counts layers: one truth for FSDP, decay and FLOPs
    assert len(blocks) == adapter.flops_shape(spec, _config(model)).layers >= 2
    assert len({type(b) for b in blocks}) == 1, "blocks of one family are one module type"
    for block in blocks:  # the innermost repeated unit: a ConvNeXt block, not a whole stage
        assert not any(isinstance(m, torch.nn.ModuleList) and len(m) for m in block.modules())
    owned = [{id(p) for p in b.parameters()} for b in blocks]
    assert all(owned), "every block holds parameters"
    assert sum(len(o) for o in owned) == len(set().union(*owned)), "blocks do not overlap"
    order = [name for name, module in model.named_modules() if any(module is b for b in blocks)]
    assert len(order) == len(blocks)
    by_id = {id(module): name for name, module in model.named_modules()}
    assert [by_id[id(b)] for b in blocks] == order, "blocks run input to output"


@pytest.mark.parametrize("family", FAMILIES)
def test_layer_ids_for_layer_wise_lr_decay(family: str) -> None:
    adapter, _, model = _tiny(family)
    if not adapter.supports_layer_decay:
        with pytest.raises(ConfigError, match=r"--layer-decay 1\.0"):
            adapter.layer_ids(model)
        return
    blocks = adapter.blocks(model)
    ids = adapter.layer_ids(model)
    assert set(ids) == {name for name, _ in model.named_parameters()}
    assert set(ids.values()) == set(range(len(blocks) + 2)), "embeddings, each block, the rest"
    names = {id(p): n for n, p in model.named_parameters()}
    assert adapter.embeddings_at is not None
    for param in model.get_submodule(adapter.embeddings_at).parameters():
        assert ids[names[id(param)]] == 0
    for i, block in enumerate(blocks):
        assert {ids[names[id(p)]] for p in block.parameters()} == {i + 1}
    # transformer block i of every ViT family is layer i + 1 (what a name-based rule says too)
    for name, layer in ids.items():
        if 0 < layer <= len(blocks):
            assert f".{layer - 1}." in f".{name}"


@pytest.mark.parametrize("family", FAMILIES)
def test_flops_shape_from_config_and_from_registry_facts(family: str) -> None:
    adapter, spec, model = _tiny(family)
    config = _config(model)
    shape = adapter.flops_shape(spec, config)
    assert shape == shape_from_config(spec, config)
    assert shape.params == spec.params
    planned = shape_from_spec(spec)
    assert planned == adapter.flops_shape(spec)
    assert planned.kind == shape.kind and planned.patch == shape.patch
    if shape.kind == "vit":
        assert (shape.layers, shape.embed_dim) == (config["num_hidden_layers"], spec.embed_dim)
        assert (shape.patch, shape.registers) == (spec.patch_size, spec.num_register_tokens)
    else:
        depths = config["depths"]
        sizes = config["hidden_sizes"]
        assert isinstance(depths, list) and isinstance(sizes, list)
        assert (shape.layers, shape.embed_dim, shape.patch) == (sum(depths), sizes[0], 4)
    assert flops_per_image(shape, 224) > 0


@pytest.mark.parametrize(
    ("name", "layers", "kind"),
    [
        ("dinov3/vits16", 12, "vit"),
        ("dinov3/vitb16", 12, "vit"),
        ("dinov3/vitl16", 24, "vit"),
        ("dinov3/vith16plus", 32, "vit"),
        ("dinov3/vit7b16", 40, "vit"),
        ("dinov2/giant", 40, "vit"),
        ("dinov3/convnext-base", 1, "convnet"),
    ],
)
def test_planning_shape_from_registry_facts_alone(name: str, layers: int, kind: str) -> None:
    shape = shape_from_spec(get_spec(name))
    assert (shape.layers, shape.kind) == (layers, kind)


def test_blocks_of_a_model_without_them_is_an_error_naming_the_path() -> None:
    adapter = get_family("dinov2")
    with pytest.raises(ModelLoadError, match=r"encoder\.layer"):
        adapter.blocks(torch.nn.Linear(2, 2))
