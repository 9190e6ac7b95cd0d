"""The baseline families of issue 16: MAE and DINO (self-supervised), CLIP and SigLIP (image-text).

Token layouts are checked against independent computations: MAE against a ``ViTModel`` holding
the same weights (the MAE encoder without masking is a ViT), CLIP's CLS against its own
``post_layernorm``, SigLIP's pooled output against its own attention-pooling head; hub-format
image-text checkpoints (the whole CLIP / SigLIP model) load their vision tower through the same
path as a user's checkpoint; extraction of the demo data stores what a direct forward gives.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import transformers

from embedkit.data.readers import read_image
from embedkit.data.transforms import Preprocessing
from embedkit.errors import ModelLoadError
from embedkit.extract import ExtractionRequest, extract
from embedkit.manifest import load_manifest
from embedkit.models import LoadedEncoder, get_family, get_spec, load_encoder
from embedkit.models.catalog import CLIP_MEAN, CLIP_STD
from embedkit.models.families import mae_tokens
from embedkit.models.loading import materialise_tiny
from embedkit.models.registry import IMAGENET_MEAN, IMAGENET_STD
from embedkit.models.throughput import flops_per_image, shape_from_config, shape_from_spec

from .conftest import put_in_hub_cache

TINY = ("test/tiny-vit-mae", "test/tiny-clip", "test/tiny-siglip")
_TINY_SIZES: dict[str, Any] = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2}


@pytest.fixture(scope="module")
def tiny(cache_dir: Path) -> dict[str, LoadedEncoder]:
    return {name: load_encoder(name, cache_dir=cache_dir) for name in TINY}


def _pixels(batch: int, height: int, width: int, seed: int = 5) -> torch.Tensor:
    return torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(seed))


# --- MAE: every patch, in its original order -------------------------------------------------


def test_mae_loads_without_masking_though_its_checkpoint_masks(
    tiny: dict[str, LoadedEncoder], cache_dir: Path
) -> None:
    encoder = tiny["test/tiny-vit-mae"]
    saved = json.loads((materialise_tiny(encoder.spec, cache_dir) / "config.json").read_text())
    assert saved["mask_ratio"] == 0.75  # what the facebook/vit-mae-* checkpoints say
    assert encoder.model.config.mask_ratio == 0.0  # type: ignore[union-attr]


def test_mae_patch_tokens_are_those_of_the_same_weights_run_as_a_plain_vit(
    tiny: dict[str, LoadedEncoder],
) -> None:
    """Without masking, the MAE encoder is a ViT: a ViTModel holding its weights gives
    ``[CLS, patches in row-major order]``, the reference for CLS and the grid (non-square)."""
    encoder = tiny["test/tiny-vit-mae"]
    config = transformers.ViTConfig(**_TINY_SIZES, intermediate_size=64, patch_size=16)
    vit = transformers.ViTModel(config, add_pooling_layer=False).eval()
    vit.load_state_dict(encoder.model.state_dict(), strict=True)
    pixels = _pixels(2, 224, 160)
    features = encoder.encode(pixels, ["cls", "patch"])
    with torch.no_grad():
        hidden = vit(pixel_values=pixels, interpolate_pos_encoding=True).last_hidden_state
    assert features["patch"].shape == (2, 14, 10, 32)
    torch.testing.assert_close(features["cls"], hidden[:, 0])
    torch.testing.assert_close(features["patch"], hidden[:, 1:].reshape(2, 14, 10, 32))


def test_mae_tokens_undo_any_shuffle(tiny: dict[str, LoadedEncoder]) -> None:
    """A forward with other noise (as in finetuning, where none is passed) returns the patches
    shuffled; the adapter puts them back with the model's ids_restore."""
    encoder = tiny["test/tiny-vit-mae"]
    spec, model = encoder.spec, encoder.model
    pixels = _pixels(2, 224, 224)
    ordered = torch.arange(196, dtype=torch.float32).expand(2, -1)
    with torch.no_grad():
        straight = model(pixel_values=pixels, noise=ordered)
        reverse = model(pixel_values=pixels, noise=-ordered)
        shuffled = model(pixel_values=pixels)  # random noise
    # the raw sequence really is reversed: the model shuffles, the adapter unshuffles
    torch.testing.assert_close(
        reverse.last_hidden_state[:, 1:], straight.last_hidden_state[:, 1:].flip(1)
    )
    expected = mae_tokens(straight, spec, (224, 224)).patches
    for out in (reverse, shuffled):
        torch.testing.assert_close(mae_tokens(out, spec, (224, 224)).patches, expected)


def test_mae_with_masking_is_refused(tiny: dict[str, LoadedEncoder]) -> None:
    masking = transformers.ViTMAEModel(transformers.ViTMAEConfig(**_TINY_SIZES)).eval()
    assert masking.config.mask_ratio == 0.75
    with torch.no_grad():
        out = masking(pixel_values=_pixels(1, 224, 224))
    with pytest.raises(ModelLoadError, match=r"kept 49 of 196 patches.*mask_ratio = 0"):
        mae_tokens(out, tiny["test/tiny-vit-mae"].spec, (224, 224))


def test_mae_features_are_deterministic(tiny: dict[str, LoadedEncoder]) -> None:
    encoder = tiny["test/tiny-vit-mae"]
    pixels = _pixels(3, 224, 224)
    torch.manual_seed(0)
    first = encoder.encode(pixels, ["patch"])["patch"]
    torch.manual_seed(1)
    assert torch.equal(encoder.encode(pixels, ["patch"])["patch"], first)


# --- CLIP and SigLIP: their own pooled semantics -----------------------------------------------


def test_clip_cls_is_the_post_layernormed_cls_token(tiny: dict[str, LoadedEncoder]) -> None:
    encoder = tiny["test/tiny-clip"]
    pixels = _pixels(2, 160, 224)
    features = encoder.encode(pixels, ["cls", "mean", "patch"])
    model: Any = encoder.model
    with torch.no_grad():
        hidden = model(pixel_values=pixels, interpolate_pos_encoding=True).last_hidden_state
        cls = model.post_layernorm(hidden[:, 0])
    assert hidden.shape[1] == 1 + 10 * 14
    torch.testing.assert_close(features["cls"], cls)
    assert not torch.allclose(features["cls"], hidden[:, 0])
    torch.testing.assert_close(features["patch"], hidden[:, 1:].reshape(2, 10, 14, 32))
    torch.testing.assert_close(features["mean"], hidden[:, 1:].mean(1))


def test_siglip_has_no_cls_and_pools_with_its_head(tiny: dict[str, LoadedEncoder]) -> None:
    encoder = tiny["test/tiny-siglip"]
    assert get_family("siglip").stored_poolings == ("pooled", "mean", "patch")
    pixels = _pixels(2, 224, 192)
    features = encoder.encode(pixels, ["pooled", "patch", "pooled+mean"])
    model: Any = encoder.model
    with torch.no_grad():
        hidden = model(pixel_values=pixels, interpolate_pos_encoding=True).last_hidden_state
        pooled = model.head(hidden)
    assert hidden.shape[1] == 14 * 12  # every token is a patch
    torch.testing.assert_close(features["pooled"], pooled)
    torch.testing.assert_close(features["patch"], hidden.reshape(2, 14, 12, 32))
    assert features["pooled+mean"].shape == (2, 64)


@pytest.mark.parametrize(
    ("name", "mean", "std"),
    [
        ("clip/vit-base16", CLIP_MEAN, CLIP_STD),
        ("siglip/vit-base16", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
        ("mae/vit-base16", IMAGENET_MEAN, IMAGENET_STD),
        ("dino/vitb16", IMAGENET_MEAN, IMAGENET_STD),
        ("test/tiny-clip", CLIP_MEAN, CLIP_STD),
    ],
)
def test_normalisation_is_the_checkpoints_own(
    name: str, mean: tuple[float, ...], std: tuple[float, ...]
) -> None:
    spec = get_spec(name)
    assert (spec.mean, spec.std) == (mean, std)


# --- hub-format checkpoints: the whole image-text model, its vision tower loaded -----------------


def _image_text_model(family: str) -> tuple[torch.nn.Module, torch.nn.Module]:
    """A tiny whole CLIP / SigLIP model (the layout of the openai/ and google/ checkpoints)."""
    torch.manual_seed(2)
    vision = {**_TINY_SIZES, "intermediate_size": 64, "patch_size": 16, "image_size": 224}
    text = {**_TINY_SIZES, "intermediate_size": 64, "vocab_size": 99}
    model: Any
    if family == "clip":
        model = transformers.CLIPModel(
            transformers.CLIPConfig(vision_config=vision, text_config=text, projection_dim=16)
        )
    else:
        model = transformers.SiglipModel(
            transformers.SiglipConfig(vision_config=vision, text_config=text)
        )
    return model.eval(), model.vision_model


@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_whole_image_text_checkpoint_loads_its_vision_tower(
    family: str, tmp_path: Path, cache_dir: Path
) -> None:
    whole, tower = _image_text_model(family)
    whole.save_pretrained(tmp_path / "ckpt")  # type: ignore[operator]
    assert json.loads((tmp_path / "ckpt" / "config.json").read_text())["model_type"] == family
    encoder = load_encoder(str(tmp_path / "ckpt"), cache_dir=cache_dir)
    assert encoder.spec.family == family
    assert (encoder.spec.embed_dim, encoder.spec.patch_size) == (32, 16)
    assert encoder.spec.params == sum(p.numel() for p in tower.parameters())
    pixels = _pixels(2, 224, 224)
    with torch.no_grad():
        reference = tower(pixel_values=pixels)
    features = encoder.encode(pixels, ["mean", "patch"])
    hidden = reference.last_hidden_state[:, 1:] if family == "clip" else reference.last_hidden_state
    torch.testing.assert_close(features["patch"], hidden.reshape(2, 14, 14, 32))
    first = "cls" if family == "clip" else "pooled"
    torch.testing.assert_close(encoder.encode(pixels, [first])[first], reference.pooler_output)
    # the FLOPs shape reads the vision tower's depth from the nested config.json
    raw = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert shape_from_config(encoder.spec, raw).layers == 2


def test_unregistered_hub_clip_builds_its_spec_from_the_snapshot(
    offline_hub: Path, cache_dir: Path
) -> None:
    whole, tower = _image_text_model("clip")
    snapshot = put_in_hub_cache(offline_hub, "someone/tiny-clip", whole, "c" * 40)
    (snapshot / "preprocessor_config.json").write_text(
        json.dumps({"image_mean": list(CLIP_MEAN), "image_std": list(CLIP_STD)})
    )
    encoder = load_encoder("someone/tiny-clip", cache_dir=cache_dir)
    assert encoder.source == f"hub:someone/tiny-clip@{'c' * 40}"
    assert (encoder.spec.family, encoder.spec.mean, encoder.spec.std) == (
        "clip",
        CLIP_MEAN,
        CLIP_STD,
    )
    pixels = _pixels(1, 224, 224)
    with torch.no_grad():
        expected = tower(pixel_values=pixels).pooler_output
    torch.testing.assert_close(encoder.encode(pixels, ["cls"])["cls"], expected)


# --- FLOPs at 224 px against published numbers ------------------------------------------------


@pytest.mark.parametrize(
    ("name", "published_gmacs"),
    [
        # timm's profiled multiply-accumulates at 224 px of the same architectures
        ("dino/vits16", 4.6),  # vit_small_patch16_224
        ("dino/vitb16", 17.6),  # vit_base_patch16_224
        ("mae/vit-base16", 17.6),
        ("clip/vit-base16", 17.6),
        ("clip/vit-base32", 4.4),  # vit_base_patch32_224
        ("mae/vit-large16", 61.6),  # vit_large_patch16_224
        ("mae/vit-huge14", 167.4),  # vit_huge_patch14_224
        ("clip/vit-large14", 81.1),  # vit_large_patch14_clip_224
    ],
)
def test_flops_at_224_match_published_numbers(name: str, published_gmacs: float) -> None:
    flops = flops_per_image(shape_from_spec(get_spec(name)), 224)
    assert flops == pytest.approx(2 * published_gmacs * 1e9, rel=0.015)


def test_siglip_flops_count_no_cls_and_the_head_once() -> None:
    spec = get_spec("test/tiny-siglip")
    model: Any = get_family("siglip").model_class(
        get_family("siglip").build_config(dict(spec.tiny_config or {}))
    )
    head = model.head
    key_value = 2 * (32 * 32 + 32)  # the key and value projections run on every token
    per_image = sum(p.numel() for p in head.parameters()) - key_value
    shape = shape_from_config(spec, model.config.to_dict())
    assert (shape.cls_token, shape.per_image_params, shape.tokens(224)) == (False, per_image, 196)
    base = get_spec("siglip/vit-base16")
    vitb = flops_per_image(shape_from_spec(get_spec("clip/vit-base16")), 224)
    # same ViT-B/16 trunk, one token fewer, plus the head's key/value projections
    assert flops_per_image(shape_from_spec(base), 224) == pytest.approx(vitb, rel=0.02)


# --- extraction of the demo data -----------------------------------------------------------------


@pytest.mark.parametrize("model", TINY)
def test_extract_demo_data(model: str, demo_manifest: Path, model_cache: Path) -> None:
    request = ExtractionRequest(
        model=model,
        dataset="demo",
        resolution=224,
        batch_size=4,
        num_workers=0,
        unit_rows=8,
        device="cpu",
    )
    result = extract(request, manifest=demo_manifest, model_cache_dir=model_cache)
    entry = result.entry
    assert entry.is_complete and result.images_computed == 24
    encoder = load_encoder(model, cache_dir=model_cache)
    table = load_manifest(demo_manifest).dataset("demo").load()
    pre = Preprocessing(size=224, mean=encoder.spec.mean, std=encoder.spec.std)
    pixels = torch.stack([pre(read_image(p)) for p in table.paths])
    spec = encoder.spec
    kwargs: dict[str, Any] = {"interpolate_pos_encoding": True}
    if spec.family == "vit-mae":
        kwargs["noise"] = torch.arange(196, dtype=torch.float32).expand(len(pixels), -1)
    with torch.inference_mode():
        out = encoder.model(pixel_values=pixels, **kwargs)
    hidden = out.last_hidden_state
    patches = hidden if spec.family == "siglip" else hidden[:, 1:]
    if spec.family == "vit-mae":
        first = ("cls", hidden[:, 0])
    else:  # CLIP: post_layernorm(CLS); SigLIP: its attention-pooling head
        first = ("cls" if spec.family == "clip" else "pooled", out.pooler_output)
    for name, reference in (first, ("mean", patches.mean(1))):
        stored = entry.read(name)
        assert stored.shape == tuple(reference.shape)
        np.testing.assert_allclose(
            stored.astype(np.float32), reference.numpy(), rtol=2e-3, atol=2e-3
        )


_S = {"hidden_size": 384, "num_attention_heads": 6, "intermediate_size": 1536}
_L = {
    "hidden_size": 1024,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "intermediate_size": 4096,
}


@pytest.mark.parametrize(
    ("name", "config"),
    [
        # the architecture in each checkpoint's config.json (defaults: ViT-B, 224 px)
        ("dino/vits16", {**_S, "patch_size": 16}),
        ("dino/vits8", {**_S, "patch_size": 8}),
        ("dino/vitb16", {"patch_size": 16}),
        ("dino/vitb8", {"patch_size": 8}),
        ("mae/vit-base16", {}),
        ("mae/vit-large16", _L),
        ("mae/vit-huge14", {**_L, "hidden_size": 1280, "num_hidden_layers": 32,
                            "intermediate_size": 5120, "patch_size": 14}),
        ("clip/vit-base16", {"patch_size": 16}),
        ("clip/vit-base32", {"patch_size": 32}),
        ("clip/vit-large14", {**_L, "patch_size": 14}),
        ("siglip/vit-base16", {"patch_size": 16}),
    ],
)  # fmt: skip
def test_registry_facts_are_those_of_the_real_architecture(
    name: str, config: dict[str, object]
) -> None:
    spec = get_spec(name)
    adapter = get_family(spec.family)
    built = adapter.build_config({"image_size": 224, **config})
    facts = adapter.facts(built)
    assert (facts.embed_dim, facts.patch_size, facts.num_register_tokens) == (
        spec.embed_dim,
        spec.patch_size,
        spec.num_register_tokens,
    )
    assert adapter.count_params(built) == spec.params  # on the meta device
    assert shape_from_spec(spec) == shape_from_config(spec, built.to_dict())


def test_mae_pretraining_checkpoint_loads_its_encoder(tmp_path: Path, cache_dir: Path) -> None:
    """The facebook/vit-mae-* checkpoints hold ViTMAEForPreTraining (encoder + decoder)."""
    torch.manual_seed(3)
    config = transformers.ViTMAEConfig(
        **_TINY_SIZES,
        intermediate_size=64,
        decoder_hidden_size=16,
        decoder_num_hidden_layers=1,
        decoder_num_attention_heads=2,
        decoder_intermediate_size=32,
    )
    whole = transformers.ViTMAEForPreTraining(config).eval()
    whole.save_pretrained(tmp_path / "ckpt")
    encoder = load_encoder(str(tmp_path / "ckpt"), cache_dir=cache_dir)
    assert encoder.spec.family == "vit-mae"
    assert encoder.model.config.mask_ratio == 0.0  # type: ignore[union-attr]
    pixels = _pixels(2, 224, 224)
    ordered = torch.arange(196, dtype=torch.float32).expand(2, -1)
    whole.config.mask_ratio = 0.0
    with torch.no_grad():
        hidden = whole.vit(pixel_values=pixels, noise=ordered).last_hidden_state
    features = encoder.encode(pixels, ["cls", "patch"])
    torch.testing.assert_close(features["cls"], hidden[:, 0])
    torch.testing.assert_close(features["patch"], hidden[:, 1:].reshape(2, 14, 14, 32))
