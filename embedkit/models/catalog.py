"""The registered encoders. Numbers come from the models' papers and model cards."""

from __future__ import annotations

from embedkit.models.registry import IMAGENET_MEAN, IMAGENET_STD, EncoderSpec, register

M = 1_000_000
DINOV3_LICENSE = "DINOv3 License"
_DINOV3_HUB = "facebook/dinov3-{}-pretrain-lvd1689m"

for size, dim, params, gflops, note in (
    ("s", 384, 21 * M, None, "ViT-S/16"),
    ("b", 768, 86 * M, 36.0, "ViT-B/16"),
    ("l", 1024, 300 * M, None, "ViT-L/16"),
    ("h", 1280, 840 * M, None, "ViT-H+/16, SwiGLU"),
    ("7b", 4096, 6_716_362_752, 2730.0, "ViT-7B/16, 40 layers, 32 heads"),
):
    slug = f"vit{size}16plus" if size == "h" else f"vit{size}16"
    register(
        EncoderSpec(
            name=f"dinov3/{slug}",
            family="dinov3-vit",
            hub_id=_DINOV3_HUB.format(slug),
            embed_dim=dim,
            params=params,
            patch_size=16,
            input_multiple=16,
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
            gated=True,
            license=DINOV3_LICENSE,
            num_register_tokens=4,
            aliases=("dinov3-7b",) if size == "7b" else (),
            gflops_224=gflops,
            description=f"DINOv3 {note}, LVD-1689M, 4 registers, RoPE",
        )
    )

for size, dim, params, gflops in (
    ("tiny", 768, 29 * M, None),
    ("small", 768, 50 * M, None),
    ("base", 1024, 89 * M, 31.0),
    ("large", 1536, 198 * M, None),
):
    register(
        EncoderSpec(
            name=f"dinov3/convnext-{size}",
            family="dinov3-convnext",
            hub_id=_DINOV3_HUB.format(f"convnext-{size}"),
            embed_dim=dim,
            params=params,
            patch_size=None,
            input_multiple=32,
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
            gated=True,
            license=DINOV3_LICENSE,
            gflops_224=gflops,
            description=f"DINOv3 ConvNeXt-{size.capitalize()}, distilled from ViT-7B",
        )
    )

for size, dim, params, gflops in (
    ("small", 384, 21 * M, None),
    ("base", 768, 86 * M, 46.0),
    ("large", 1024, 300 * M, None),
    ("giant", 1536, 1100 * M, None),
):
    for namespace, family, hub, registers in (
        ("dinov2", "dinov2", f"facebook/dinov2-{size}", 0),
        ("dinov2-reg", "dinov2-reg", f"facebook/dinov2-with-registers-{size}", 4),
    ):
        register(
            EncoderSpec(
                name=f"{namespace}/{size}",
                family=family,
                hub_id=hub,
                embed_dim=dim,
                params=params,
                patch_size=14,
                input_multiple=14,
                mean=IMAGENET_MEAN,
                std=IMAGENET_STD,
                gated=False,
                license="apache-2.0",
                num_register_tokens=registers,
                # FLOPs measured without registers; 4 extra tokens change them by <2%.
                gflops_224=gflops if registers == 0 else None,
                description=f"DINOv2 ViT-{size[0].upper()}/14"
                + (" with 4 registers" if registers else "")
                + ", LVD-142M; learned pos-embed at 518 px, interpolated",
            )
        )

register(
    EncoderSpec(
        name="imagenet/convnext-base",
        family="convnext",
        hub_id="facebook/convnext-base-224-22k",
        embed_dim=1024,
        params=89 * M,
        patch_size=None,
        input_multiple=32,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        gated=False,
        license="apache-2.0",
        gflops_224=31.0,
        description="ConvNeXt-B, ImageNet-22k supervised (ConvNextModel)",
    )
)
register(
    EncoderSpec(
        name="imagenet/vit-base16",
        family="vit",
        hub_id="google/vit-base-patch16-224-in21k",
        embed_dim=768,
        params=86 * M,
        patch_size=16,
        input_multiple=16,
        # The checkpoint's preprocessor_config.json normalises with 0.5 / 0.5, not ImageNet's.
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
        gated=False,
        license="apache-2.0",
        description="ViT-B/16, ImageNet-21k supervised (ViTModel without its tanh pooler)",
    )
)

# --- self-supervised baselines: DINO (v1) and MAE ------------------------------------------

for slug, dim, patch_px, params in (
    ("vits16", 384, 16, 21_665_664),
    ("vits8", 384, 8, 21_670_272),
    ("vitb16", 768, 16, 85_798_656),
    ("vitb8", 768, 8, 85_807_872),
):
    register(
        EncoderSpec(
            name=f"dino/{slug}",
            family="vit",  # DINO checkpoints are ViTModel ones
            hub_id=f"facebook/dino-{slug}",
            embed_dim=dim,
            params=params,
            patch_size=patch_px,
            input_multiple=patch_px,
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
            gated=False,
            license="apache-2.0",
            description=f"DINO (v1) ViT-{slug[3].upper()}/{patch_px}, ImageNet-1k self-supervised",
        )
    )

for size, dim, patch_px, params in (
    ("base", 768, 16, 85_798_656),
    ("large", 1024, 16, 303_301_632),
    ("huge", 1280, 14, 630_764_800),
):
    register(
        EncoderSpec(
            name=f"mae/vit-{size}{patch_px}",
            family="vit-mae",
            hub_id=f"facebook/vit-mae-{size}",
            embed_dim=dim,
            params=params,
            patch_size=patch_px,
            input_multiple=patch_px,
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
            gated=False,
            license="apache-2.0",
            description=f"MAE ViT-{size[0].upper()}/{patch_px} encoder, ImageNet-1k "
            "self-supervised; run without masking (mask_ratio 0), patches in their original order",
        )
    )

# --- weakly supervised (image-text) baselines: the vision towers of CLIP and SigLIP ----------

#: OpenAI CLIP's normalisation (its preprocessor_config.json), not ImageNet's.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
#: SigLIP normalises to [-1, 1].
SIGLIP_MEAN = SIGLIP_STD = (0.5, 0.5, 0.5)

for slug, hub, dim, patch_px, params in (
    ("vit-base16", "openai/clip-vit-base-patch16", 768, 16, 85_799_424),
    ("vit-base32", "openai/clip-vit-base-patch32", 768, 32, 87_456_000),
    ("vit-large14", "openai/clip-vit-large-patch14", 1024, 14, 303_179_776),
):
    register(
        EncoderSpec(
            name=f"clip/{slug}",
            family="clip",
            hub_id=hub,
            embed_dim=dim,
            params=params,
            patch_size=patch_px,
            input_multiple=patch_px,
            mean=CLIP_MEAN,
            std=CLIP_STD,
            gated=False,
            license="mit",
            description=f"OpenAI CLIP ViT-{slug[4].upper()}/{patch_px} vision tower (WIT-400M "
            "image-text); cls = post-LayerNorm CLS (the pooler output)",
        )
    )
register(
    EncoderSpec(
        name="siglip/vit-base16",
        family="siglip",
        hub_id="google/siglip-base-patch16-224",
        embed_dim=768,
        params=92_884_224,
        patch_size=16,
        input_multiple=16,
        mean=SIGLIP_MEAN,
        std=SIGLIP_STD,
        gated=False,
        license="apache-2.0",
        description="SigLIP ViT-B/16 vision tower at 224 px (WebLI image-text); no CLS token, "
        "pooled = attention-pooling head",
    )
)

# --- tiny test entries: the real architectures at a tiny size, random weights (fixed seed) ---

_TINY_VIT = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2}
_TINY_CONVNEXT = {"hidden_sizes": [8, 16, 24, 32], "depths": [1, 1, 1, 1]}
_TINY: tuple[tuple[str, str, int | None, int, int, dict[str, object]], ...] = (
    # name, family, patch, registers, params, config
    (
        "tiny-dinov3-vit",
        "dinov3-vit",
        16,
        4,
        42_016,
        {**_TINY_VIT, "intermediate_size": 64, "patch_size": 16, "num_register_tokens": 4},
    ),
    ("tiny-dinov3-convnext", "dinov3-convnext", None, 0, 25_760, dict(_TINY_CONVNEXT)),
    ("tiny-dinov2", "dinov2", 14, 0, 44_416, {**_TINY_VIT, "mlp_ratio": 2, "patch_size": 14}),
    (
        "tiny-dinov2-reg",
        "dinov2-reg",
        14,
        4,
        44_544,
        {**_TINY_VIT, "mlp_ratio": 2, "patch_size": 14, "num_register_tokens": 4},
    ),
    ("tiny-convnext", "convnext", None, 0, 25_760, dict(_TINY_CONVNEXT)),
    ("tiny-vit", "vit", 16, 0, 48_096, {**_TINY_VIT, "intermediate_size": 64, "patch_size": 16}),
    # mask_ratio stays at the checkpoints' 0.75: loading sets it to 0 (the family's overrides)
    ("tiny-vit-mae", "vit-mae", 16, 0, 48_096, {**_TINY_VIT, "intermediate_size": 64}),
    ("tiny-clip", "clip", 16, 0, 48_128, {**_TINY_VIT, "intermediate_size": 64, "patch_size": 16}),
    ("tiny-siglip", "siglip", 16, 0, 56_544, {**_TINY_VIT, "intermediate_size": 64}),
)
_TINY_NORMALISATION = {"clip": (CLIP_MEAN, CLIP_STD), "siglip": (SIGLIP_MEAN, SIGLIP_STD)}
for name, family, patch, registers, params, config in _TINY:
    mean, std = _TINY_NORMALISATION.get(family, (IMAGENET_MEAN, IMAGENET_STD))
    register(
        EncoderSpec(
            name=f"test/{name}",
            family=family,
            hub_id=None,
            embed_dim=32,
            params=params,
            patch_size=patch,
            input_multiple=patch or 32,
            mean=mean,
            std=std,
            gated=False,
            license="none (random weights)",
            num_register_tokens=registers,
            tiny_config={**config, "image_size": 224},
            description=f"tiny random {family} for tests",
        )
    )
