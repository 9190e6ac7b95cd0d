from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from embedkit.errors import ModelLoadError, ResolutionError, UnknownModelError
from embedkit.models import (
    EncoderSpec,
    HubRef,
    get_family,
    get_spec,
    list_specs,
    register,
    resolve,
    validate_resolution,
)
from embedkit.models.registry import IMAGENET_MEAN, IMAGENET_STD, unregister

from .conftest import write_config

ALL_SPECS = list_specs()
IDS = [spec.name for spec in ALL_SPECS]


def test_catalog_has_the_protocol_entries() -> None:
    names = set(IDS)
    expected = {
        *(f"dinov3/vit{s}16" for s in ("s", "b", "l", "7b")),
        "dinov3/vith16plus",
        *(f"dinov3/convnext-{s}" for s in ("tiny", "small", "base", "large")),
        *(
            f"{ns}/{s}"
            for ns in ("dinov2", "dinov2-reg")
            for s in ("small", "base", "large", "giant")
        ),
        "imagenet/convnext-base",
        "imagenet/vit-base16",
        *(f"test/tiny-{f}" for f in ("dinov3-vit", "dinov3-convnext", "dinov2", "dinov2-reg")),
        "test/tiny-convnext",
        "test/tiny-vit",
        # the baselines of issue 16: self-supervised (DINO v1, MAE), image-text (CLIP, SigLIP)
        *(f"dino/vit{s}" for s in ("s16", "s8", "b16", "b8")),
        *(f"mae/vit-{s}" for s in ("base16", "large16", "huge14")),
        *(f"clip/vit-{s}" for s in ("base16", "base32", "large14")),
        "siglip/vit-base16",
        *(f"test/tiny-{f}" for f in ("vit-mae", "clip", "siglip")),
    }
    assert expected <= names


@pytest.mark.parametrize("spec", ALL_SPECS, ids=IDS)
def test_spec_facts_are_consistent(spec: EncoderSpec) -> None:
    adapter = get_family(spec.family)
    assert get_spec(spec.name) is spec
    for alias in spec.aliases:
        assert get_spec(alias) is spec
    if spec.patch_size is None:
        assert spec.input_multiple == 32
        assert "cls" not in adapter.stored_poolings
    else:
        assert spec.input_multiple == spec.patch_size
        # a ViT without a CLS token (SigLIP) offers its pooler output instead
        assert {"cls", "pooled"} & set(adapter.stored_poolings)
    assert (spec.hub_id is None) == (spec.tiny_config is not None)
    if spec.tiny_config is not None:
        config = adapter.build_config(spec.tiny_config)
        facts = adapter.facts(config)
        assert (facts.embed_dim, facts.patch_size, facts.input_multiple) == (
            spec.embed_dim,
            spec.patch_size,
            spec.input_multiple,
        )
        assert facts.num_register_tokens == spec.num_register_tokens
        assert adapter.count_params(config) == spec.params
    if spec.family in {"dinov3-vit", "dinov2-reg"}:
        assert spec.num_register_tokens == 4
    if spec.name.startswith("dinov3/"):
        assert spec.gated
    if spec.family.startswith("dinov"):
        assert (spec.mean, spec.std) == (IMAGENET_MEAN, IMAGENET_STD)


def test_dinov3_7b_alias_and_numbers() -> None:
    spec = get_spec("dinov3-7b")
    assert spec.name == "dinov3/vit7b16"
    assert spec.hub_id == "facebook/dinov3-vit7b16-pretrain-lvd1689m"
    assert spec.embed_dim == 4096
    assert spec.params == pytest.approx(6.716e9, rel=1e-3)
    assert spec.gflops_224 == pytest.approx(2730)
    # The parameter count is that of the real architecture (built on the meta device).
    adapter = get_family(spec.family)
    config = adapter.build_config(
        {
            "hidden_size": 4096,
            "intermediate_size": 8192,
            "num_hidden_layers": 40,
            "num_attention_heads": 32,
            "use_gated_mlp": True,
            "num_register_tokens": 4,
        }
    )
    assert adapter.count_params(config) == spec.params


@pytest.mark.parametrize(
    ("name", "expected"),
    [("dinov3/vitb61", "dinov3/vitb16"), ("dinov2/bsae", "dinov2/base"), ("dinov3-7", "dinov3-7b")],
)
def test_unknown_name_suggests_close_names(name: str, expected: str) -> None:
    with pytest.raises(UnknownModelError, match=f"did you mean .*'{expected}'") as info:
        get_spec(name)
    assert "embedkit models" in str(info.value)
    assert "org/name" in str(info.value)
    assert isinstance(info.value, LookupError)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("DINOv3/ViTB16", "dinov3/vitb16"),
        ("DINOv3-7B", "dinov3-7b"),
        ("Dinov3/VITB61", "dinov3/vitb16"),
    ],
)
def test_names_match_without_letter_case_and_are_never_hub_ids(name: str, expected: str) -> None:
    """`DINOv3/ViTB16` is a registry name in other letter case, not a hub lookup."""
    with pytest.raises(UnknownModelError, match=f"did you mean .*'{expected}'"):
        resolve(name)


def test_duplicate_name_or_alias_raises() -> None:
    spec = get_spec("test/tiny-vit")
    with pytest.raises(ValueError, match="already registered"):
        register(spec)
    clash = dataclasses.replace(spec, name="test/other-vit", aliases=("dinov3-7b",))
    with pytest.raises(ValueError, match="'dinov3-7b' is already registered"):
        register(clash)
    assert "test/other-vit" not in {s.name for s in list_specs()}


def test_register_and_unregister_a_new_entry() -> None:
    spec = dataclasses.replace(get_spec("test/tiny-vit"), name="test/extra-vit", aliases=("xvit",))
    register(spec)
    try:
        assert get_spec("xvit") is spec
    finally:
        unregister("test/extra-vit")
    with pytest.raises(UnknownModelError):
        get_spec("xvit")


def test_register_rejects_unknown_family() -> None:
    spec = dataclasses.replace(get_spec("test/tiny-vit"), name="test/x", family="resnet")
    with pytest.raises(UnknownModelError, match="dinov3-vit"):
        register(spec)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"embed_dim": 0}, "positive int embed_dim"),
        ({"input_multiple": 24}, "multiple of patch_size 16"),
        ({"std": (0.2, 0.0, 0.2)}, "positive std"),
        ({"mean": (0.5, 0.5)}, "three floats for mean"),
        ({"hub_id": "not a hub id"}, "org/name"),
    ],
)
def test_spec_validates_when_built(change: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(get_spec("test/tiny-vit"), **change)  # type: ignore[arg-type]


def test_specs_are_hashable_and_immutable() -> None:
    spec = get_spec("test/tiny-dinov3-vit")
    assert hash(spec) == hash(get_spec("test/tiny-dinov3-vit"))
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.embed_dim = 1  # type: ignore[misc]
    with pytest.raises(TypeError):
        spec.tiny_config["hidden_size"] = 1  # type: ignore[index]


def test_unregistered_hub_id_resolves_to_a_hub_ref() -> None:
    assert resolve("facebook/dinov2-small-imagenet1k-1-layer") == HubRef(
        "facebook/dinov2-small-imagenet1k-1-layer"
    )
    # A registry namespace is never taken for a hub organisation, unless forced.
    with pytest.raises(UnknownModelError):
        resolve("dinov3/vitq16")
    assert resolve("hf-hub:dinov3/vitq16") == HubRef("dinov3/vitq16")


def test_unregistered_hub_id_spec_offline_is_a_load_error() -> None:
    with pytest.raises(ModelLoadError, match="could not download someorg/somemodel"):
        get_spec("someorg/somemodel")


def test_missing_directory_is_named() -> None:
    with pytest.raises(UnknownModelError, match="not a model directory"):
        resolve("/nonexistent/checkpoint")


def test_local_directory_spec_from_config(tmp_path: Path) -> None:
    directory = write_config(
        tmp_path / "ckpt",
        {
            "model_type": "dinov2_with_registers",
            "hidden_size": 48,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "patch_size": 14,
            "num_register_tokens": 4,
        },
    )
    (directory / "preprocessor_config.json").write_text(
        '{"image_mean": [0.5, 0.5, 0.5], "image_std": [0.25, 0.25, 0.25]}'
    )
    spec = get_spec(str(directory))
    assert spec.name == str(directory.resolve())
    assert spec.family == "dinov2-reg"
    assert (spec.embed_dim, spec.patch_size, spec.input_multiple) == (48, 14, 14)
    assert spec.num_register_tokens == 4
    assert spec.mean == (0.5, 0.5, 0.5)
    assert spec.std == (0.25, 0.25, 0.25)
    with torch.device("meta"):
        model = get_family("dinov2-reg").model_class(
            get_family("dinov2-reg").config_class.from_pretrained(directory)
        )
    assert spec.params == sum(p.numel() for p in model.parameters())


def test_local_directory_of_unsupported_model_type_names_supported_ones(tmp_path: Path) -> None:
    directory = write_config(tmp_path / "bert", {"model_type": "bert"})
    with pytest.raises(UnknownModelError, match="'bert' is not supported") as info:
        get_spec(str(directory))
    for model_type in ("dinov3_vit", "dinov3_convnext", "dinov2", "convnext", "vit"):
        assert model_type in str(info.value)


def test_directory_without_config_json(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"no config\.json"):
        get_spec(str(tmp_path))


@pytest.mark.parametrize(
    ("name", "resolution", "expected"),
    [
        ("dinov3/vitb16", 224, 224),
        ("dinov3/vitb16", 512, 512),
        ("dinov2/base", 518, 518),
        ("dinov2/base", 512, 518),  # 504 or 518: 518 is nearer
        ("dinov2/base", 511, 504 + 14),
        ("dinov2/base", 510, 504),
        ("dinov3/vitb16", 8, 16),  # a tie rounds up
        ("dinov3/vitb16", 3, 16),  # never below one patch
        ("imagenet/convnext-base", 500, 512),
    ],
)
def test_validate_resolution_snaps(name: str, resolution: int, expected: int) -> None:
    assert validate_resolution(get_spec(name), resolution, snap=True) == expected


def test_validate_resolution_error_names_neighbours_and_flag() -> None:
    spec = get_spec("dinov2/base")
    assert validate_resolution(spec, 224) == 224
    with pytest.raises(ResolutionError, match="504 or 518") as info:
        validate_resolution(spec, 512)
    assert "--snap-resolution" in str(info.value)
    assert isinstance(info.value, ValueError)
    with pytest.raises(ResolutionError, match="positive integer"):
        validate_resolution(spec, 0, snap=True)
