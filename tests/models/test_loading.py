from __future__ import annotations

import importlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from embedkit.errors import ModelLoadError, ResolutionError, UnknownModelError
from embedkit.models import LoadedEncoder, get_family, get_spec, load_encoder, weights_fingerprint
from embedkit.models.loading import identify_encoder, materialise_tiny

from .conftest import TINY_NAMES, put_in_hub_cache, write_config

Expected = dict[str, torch.Tensor]


def _vit(prefix: int) -> Callable[[Any, int, int], Expected]:
    """Slice ``[CLS, registers, patches]`` by hand."""

    def slice_(out: Any, h: int, w: int) -> Expected:
        hidden = out.last_hidden_state
        assert hidden.shape[1] == prefix + h * w  # the documented token layout
        patches = hidden[:, prefix:]
        return {
            "cls": hidden[:, 0],
            "mean": patches.mean(1),
            "patch": patches.reshape(hidden.shape[0], h, w, -1),
        }

    return slice_


def _dinov3_convnext(out: Any, h: int, w: int) -> Expected:
    hidden = out.last_hidden_state  # [pooled, map tokens]
    assert hidden.shape[1] == 1 + h * w
    return {
        "pooled": hidden[:, 0],
        "mean": hidden[:, 1:].mean(1),
        "patch": hidden[:, 1:].reshape(hidden.shape[0], h, w, -1),
    }


def _convnext(out: Any, h: int, w: int) -> Expected:
    feature_map = out.last_hidden_state  # (B, C, h, w)
    assert feature_map.shape[2:] == (h, w)
    return {
        "pooled": out.pooler_output,
        "mean": feature_map.mean((2, 3)),
        "patch": feature_map.permute(0, 2, 3, 1),
    }


def _clip(out: Any, h: int, w: int) -> Expected:
    hidden = out.last_hidden_state  # [CLS, patches], not layer-normed
    assert hidden.shape[1] == 1 + h * w
    patches = hidden[:, 1:]
    return {
        "cls": out.pooler_output,  # post_layernorm(CLS)
        "mean": patches.mean(1),
        "patch": patches.reshape(hidden.shape[0], h, w, -1),
    }


def _siglip(out: Any, h: int, w: int) -> Expected:
    hidden = out.last_hidden_state  # [patches]: no CLS token
    assert hidden.shape[1] == h * w
    return {
        "pooled": out.pooler_output,  # the attention-pooling head
        "mean": hidden.mean(1),
        "patch": hidden.reshape(hidden.shape[0], h, w, -1),
    }


BY_HAND = {
    "test/tiny-dinov3-vit": _vit(1 + 4),
    "test/tiny-dinov2": _vit(1),
    "test/tiny-dinov2-reg": _vit(1 + 4),
    "test/tiny-vit": _vit(1),
    "test/tiny-dinov3-convnext": _dinov3_convnext,
    "test/tiny-convnext": _convnext,
    "test/tiny-vit-mae": _vit(1),  # with ordered noise (below), MAE keeps the patch order
    "test/tiny-clip": _clip,
    "test/tiny-siglip": _siglip,
}


def test_every_tiny_entry_has_a_hand_slicer() -> None:
    assert set(BY_HAND) == set(TINY_NAMES)


@pytest.fixture(scope="session")
def encoders(cache_dir: Path) -> dict[str, LoadedEncoder]:
    return {name: load_encoder(name, cache_dir=cache_dir) for name in TINY_NAMES}


@pytest.mark.parametrize("name", TINY_NAMES)
def test_tiny_loads_through_the_local_directory_path(
    name: str, encoders: dict[str, LoadedEncoder], cache_dir: Path
) -> None:
    encoder = encoders[name]
    assert encoder.source == f"tiny:{name}"
    assert encoder.weights_fingerprint.startswith("sha256:")
    assert not encoder.model.training
    assert not any(p.requires_grad for p in encoder.model.parameters())
    assert encoder.dtype == torch.float32
    assert type(encoder.model).__name__ == get_family(encoder.spec.family).model_class_name
    directory = materialise_tiny(encoder.spec, cache_dir)
    assert directory.is_relative_to(cache_dir / "tiny-models" / name)
    assert {p.name for p in directory.iterdir()} == {"config.json", "model.safetensors"}
    assert (
        json.loads((directory / "config.json").read_text())["model_type"]
        in get_family(encoder.spec.family).model_types
    )


@pytest.mark.parametrize("name", TINY_NAMES)
@pytest.mark.parametrize("scale", [14, 10])  # 224 px for patch 16, and a second resolution
def test_encode_matches_a_direct_forward(
    name: str, scale: int, encoders: dict[str, LoadedEncoder]
) -> None:
    encoder = encoders[name]
    spec = encoder.spec
    resolution = 224 if scale == 14 else spec.input_multiple * scale
    pixels = torch.randn(2, 3, resolution, resolution, generator=torch.Generator().manual_seed(3))
    poolings = [*get_family(spec.family).stored_poolings]
    if "cls" in poolings:
        poolings.append("cls+mean")
    features = encoder.encode(pixels, poolings)

    side = resolution // spec.feature_stride
    kwargs: dict[str, Any] = {}
    if spec.family in {"vit", "vit-mae", "clip", "siglip"}:  # learned / fixed 224 px pos-embed
        kwargs["interpolate_pos_encoding"] = True
    if spec.family == "vit-mae":  # argsort of increasing noise: no shuffle
        kwargs["noise"] = torch.arange(side * side, dtype=torch.float32).expand(2, -1)
    with torch.no_grad():
        out = encoder.model(pixel_values=pixels, **kwargs)
    expected = BY_HAND[name](out, side, side)
    for key, value in expected.items():
        assert features[key].dtype == torch.float32
        torch.testing.assert_close(features[key], value, rtol=1e-5, atol=1e-6, msg=key)
    assert features["patch"].shape == (2, side, side, spec.embed_dim)
    if "cls+mean" in features:
        assert features["cls+mean"].shape == (2, 2 * spec.embed_dim)
        torch.testing.assert_close(
            features["cls+mean"], torch.cat([expected["cls"], expected["mean"]], 1)
        )
    if spec.family in {"dinov3-vit", "dinov2", "dinov2-reg"}:  # pooler_output is the CLS token
        assert torch.equal(out.pooler_output, out.last_hidden_state[:, 0])


def test_patch_tokens_are_row_major(encoders: dict[str, LoadedEncoder]) -> None:
    """A non-square input gives an (h, w) grid in the order of the ConvNeXt feature map."""
    encoder = encoders["test/tiny-convnext"]
    pixels = torch.randn(1, 3, 64, 160, generator=torch.Generator().manual_seed(4))
    patch = encoder.encode(pixels, ["patch"])["patch"]
    with torch.no_grad():
        feature_map = encoder.model(pixel_values=pixels).last_hidden_state
    assert patch.shape == (1, 2, 5, 32)
    assert torch.equal(patch[0, 1, 3], feature_map[0, :, 1, 3])
    vit = encoders["test/tiny-dinov3-vit"]
    grid = vit.encode(torch.zeros(1, 3, 32, 80), ["patch"])["patch"]
    assert grid.shape == (1, 2, 5, 32)


@pytest.mark.parametrize("name", TINY_NAMES)
def test_encode_is_deterministic(
    name: str, encoders: dict[str, LoadedEncoder], pixels: torch.Tensor
) -> None:
    """DINOv3's RoPE jitters in train mode; the loaded encoder must be in eval mode."""
    encoder = encoders[name]
    first = encoder.encode(pixels, ["mean"])["mean"]
    second = encoder.encode(pixels, ["mean"])["mean"]
    assert torch.equal(first, second)


def test_dinov3_train_mode_would_jitter(
    encoders: dict[str, LoadedEncoder], pixels: torch.Tensor
) -> None:
    """Guards the test above: in train mode the tiny DINOv3 does give different outputs."""
    model = encoders["test/tiny-dinov3-vit"].model
    try:
        model.train()
        with torch.no_grad():
            first = model(pixel_values=pixels).last_hidden_state
            second = model(pixel_values=pixels).last_hidden_state
    finally:
        model.eval()
    assert not torch.equal(first, second)


@pytest.mark.parametrize("name", TINY_NAMES)
def test_save_and_reload_is_bit_identical(
    name: str, encoders: dict[str, LoadedEncoder], pixels: torch.Tensor, tmp_path: Path
) -> None:
    encoder = encoders[name]
    encoder.model.save_pretrained(tmp_path / "copy")  # type: ignore[operator]
    reloaded = load_encoder(str(tmp_path / "copy"), cache_dir=tmp_path / "cache")
    assert reloaded.source == f"local:{(tmp_path / 'copy').resolve()}"
    assert reloaded.spec.family == encoder.spec.family
    assert reloaded.spec.embed_dim == encoder.spec.embed_dim
    assert reloaded.spec.num_register_tokens == encoder.spec.num_register_tokens
    assert reloaded.spec.params == encoder.spec.params
    poolings = ["mean", "patch"]
    first, second = encoder.encode(pixels, poolings), reloaded.encode(pixels, poolings)
    for key in poolings:
        assert torch.equal(first[key], second[key])


def test_two_loads_share_the_fingerprint(
    encoders: dict[str, LoadedEncoder], cache_dir: Path
) -> None:
    again = load_encoder("test/tiny-dinov2", cache_dir=cache_dir)
    assert again.weights_fingerprint == encoders["test/tiny-dinov2"].weights_fingerprint
    fingerprints = {e.weights_fingerprint for e in encoders.values()}
    assert len(fingerprints) == len(encoders)


def test_tiny_weights_are_the_same_in_another_process(
    encoders: dict[str, LoadedEncoder], tmp_path: Path
) -> None:
    """A fresh process, a fresh cache dir, and other RNG use first: the same weights."""
    code = (
        "import torch, sys; torch.rand(5); from embedkit.models import load_encoder;"
        "print(load_encoder('test/tiny-dinov3-vit', cache_dir=sys.argv[1]).weights_fingerprint)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "fresh")],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert result.stdout.strip() == encoders["test/tiny-dinov3-vit"].weights_fingerprint


def test_changing_one_weight_changes_the_fingerprint(cache_dir: Path, tmp_path: Path) -> None:
    source = materialise_tiny(get_spec("test/tiny-vit"), cache_dir)
    directory = tmp_path / "ckpt"
    shutil.copytree(source, directory)
    memo_root = tmp_path / "memo"
    original = weights_fingerprint(directory, memo_root)
    assert original == weights_fingerprint(source, cache_dir)  # content, not path

    weights = load_file(directory / "model.safetensors")
    key = sorted(weights)[0]
    weights[key] = weights[key].clone()
    weights[key].view(-1)[0] += 1.0
    save_file(weights, directory / "model.safetensors", metadata={"format": "pt"})
    changed = weights_fingerprint(directory, memo_root)
    assert changed != original

    config = json.loads((directory / "config.json").read_text())
    config["layer_norm_eps"] = 1e-6
    (directory / "config.json").write_text(json.dumps(config))
    assert weights_fingerprint(directory, memo_root) not in {original, changed}


def test_fingerprint_memo_is_keyed_by_size_and_mtime(cache_dir: Path, tmp_path: Path) -> None:
    directory = tmp_path / "ckpt"
    shutil.copytree(materialise_tiny(get_spec("test/tiny-vit"), cache_dir), directory)
    memo_root = tmp_path / "memo"
    original = weights_fingerprint(directory, memo_root)
    memo_path = memo_root / "fingerprints.json"
    memo = json.loads(memo_path.read_text())
    weights_key = str((directory / "model.safetensors").resolve())
    assert memo[weights_key]["size"] == (directory / "model.safetensors").stat().st_size

    # A memoised digest is trusted while size and mtime_ns are unchanged ...
    memo[weights_key]["sha256"] = "0" * 64
    memo_path.write_text(json.dumps(memo))
    assert weights_fingerprint(directory, memo_root) != original
    # ... and recomputed once the file is touched.
    os.utime(directory / "model.safetensors", ns=(1, 1))
    assert weights_fingerprint(directory, memo_root) == original


def test_materialise_tiny_tolerates_a_finished_racer(cache_dir: Path, tmp_path: Path) -> None:
    spec = get_spec("test/tiny-convnext")
    first = materialise_tiny(spec, tmp_path)
    before = (first / "model.safetensors").read_bytes()
    assert materialise_tiny(spec, tmp_path) == first
    assert (first / "model.safetensors").read_bytes() == before
    assert not [p for p in first.parent.iterdir() if p.name.startswith(".tmp-")]


def test_encode_rejects_bad_resolution_and_pooling(encoders: dict[str, LoadedEncoder]) -> None:
    encoder = encoders["test/tiny-dinov2"]
    with pytest.raises(ResolutionError, match="multiple of 14"):
        encoder.encode(torch.zeros(1, 3, 220, 220), ["cls"])
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        encoder.encode(torch.zeros(3, 224, 224), ["cls"])
    convnext = encoders["test/tiny-dinov3-convnext"]
    with pytest.raises(ValueError, match="'cls' is not available"):
        convnext.encode(torch.zeros(1, 3, 224, 224), ["cls"])


# --- hub loading, offline -----------------------------------------------------------------------


def test_registered_hub_model_offline_is_a_helpful_error(cache_dir: Path) -> None:
    with pytest.raises(ModelLoadError) as info:
        load_encoder("dinov3/vitb16", cache_dir=cache_dir)
    message = str(info.value)
    assert "could not download facebook/dinov3-vitb16-pretrain-lvd1689m" in message
    assert "offline" in message
    assert "--model /path/to/dir" in message
    assert "hf download facebook/dinov3-vitb16-pretrain-lvd1689m --local-dir" in message
    assert isinstance(info.value, RuntimeError)


def test_gated_repository_says_how_to_get_access(
    cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import huggingface_hub
    from huggingface_hub import errors

    # The HTTP library behind huggingface_hub (httpx or its fork) provides Response and Request.
    http = importlib.import_module(vars(errors)["Response"].__module__)
    response = http.Response(403, request=http.Request("GET", "https://huggingface.co/x"))

    def gated(*args: object, **kwargs: object) -> str:
        raise errors.GatedRepoError("Access restricted", response=response)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", gated)
    with pytest.raises(ModelLoadError, match="gated repository") as info:
        load_encoder("dinov3-7b", cache_dir=cache_dir)
    message = str(info.value)
    assert "https://huggingface.co/facebook/dinov3-vit7b16-pretrain-lvd1689m" in message
    assert "HF_TOKEN" in message
    assert "hf auth login" in message
    assert "--model /path/to/dir" in message


def _hub_model(family: str, config: dict[str, object]) -> torch.nn.Module:
    adapter = get_family(family)
    torch.manual_seed(5)
    return adapter.model_class(adapter.build_config(config), **adapter.model_kwargs)


def test_registered_hub_model_loads_from_the_hub_cache(offline_hub: Path, cache_dir: Path) -> None:
    commit = "c0ffee" + "0" * 34
    model = _hub_model(
        "dinov2",
        {"hidden_size": 384, "num_hidden_layers": 1, "num_attention_heads": 6, "patch_size": 14},
    )
    put_in_hub_cache(offline_hub, "facebook/dinov2-small", model, commit)
    encoder = load_encoder("dinov2/small", cache_dir=cache_dir)
    assert encoder.source == f"hub:facebook/dinov2-small@{commit}"
    assert encoder.weights_fingerprint == f"commit:{commit}"
    assert encoder.spec is get_spec("dinov2/small")
    pixels = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        expected = model.eval()(pixel_values=pixels).last_hidden_state[:, 0]
    assert torch.equal(encoder.encode(pixels, ["cls"])["cls"], expected)


def test_registered_hub_model_with_other_architecture_is_refused(
    offline_hub: Path, cache_dir: Path
) -> None:
    model = _hub_model(
        "dinov2", {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2}
    )
    put_in_hub_cache(offline_hub, "facebook/dinov2-base", model, "1" * 40)
    with pytest.raises(ModelLoadError, match=r"registry entry says \(768, 14, 0\)"):
        load_encoder("dinov2/base", cache_dir=cache_dir)


def test_unregistered_hub_id_builds_its_spec_on_load(offline_hub: Path, cache_dir: Path) -> None:
    model = _hub_model(
        "dinov3-vit",
        {
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "num_register_tokens": 4,
        },
    )
    snapshot = put_in_hub_cache(offline_hub, "someone/dinov3-ct", model, "2" * 40)
    (snapshot / "preprocessor_config.json").write_text(
        '{"image_mean": [0.1, 0.2, 0.3], "image_std": [0.4, 0.5, 0.6]}'
    )
    spec = get_spec("someone/dinov3-ct")
    encoder = load_encoder("someone/dinov3-ct", cache_dir=cache_dir)
    assert encoder.spec == spec
    assert spec.family == "dinov3-vit"
    assert (spec.embed_dim, spec.num_register_tokens, spec.input_multiple) == (32, 4, 16)
    assert spec.params == sum(p.numel() for p in model.parameters())
    assert spec.mean == (0.1, 0.2, 0.3)
    assert encoder.source == "hub:someone/dinov3-ct@" + "2" * 40
    assert encoder.encode(torch.zeros(1, 3, 64, 64), ["cls+mean"])["cls+mean"].shape == (1, 64)


def test_revision_is_refused_for_local_models(cache_dir: Path) -> None:
    with pytest.raises(ModelLoadError, match="hub models only"):
        load_encoder("test/tiny-vit", revision="main", cache_dir=cache_dir)


# --- local directories --------------------------------------------------------------------------


def test_local_directory_with_unsupported_model_type(tmp_path: Path) -> None:
    directory = write_config(tmp_path / "swin", {"model_type": "swin"})
    with pytest.raises(UnknownModelError, match=r"'swin' is not supported.*dinov3_vit"):
        load_encoder(str(directory), cache_dir=tmp_path)


def test_local_directory_with_missing_weights_is_refused(
    encoders: dict[str, LoadedEncoder], tmp_path: Path
) -> None:
    directory = tmp_path / "partial"
    encoders["test/tiny-vit"].model.save_pretrained(directory)  # type: ignore[operator]
    weights = load_file(directory / "model.safetensors")
    dropped = sorted(weights)[-1]
    del weights[dropped]
    save_file(weights, directory / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match="randomly initialised") as info:
        load_encoder(str(directory), cache_dir=tmp_path)
    assert dropped in str(info.value)


def test_local_directory_without_weights(tmp_path: Path) -> None:
    directory = tmp_path / "empty"
    get_family("vit").build_config({"hidden_size": 32}).save_pretrained(directory)
    with pytest.raises(ModelLoadError, match=r"no \*\.safetensors .* checkpoint folder"):
        load_encoder(str(directory), cache_dir=tmp_path)


def test_unknown_dtype(cache_dir: Path) -> None:
    with pytest.raises(ValueError, match="fp32, float32, bf16"):
        load_encoder("test/tiny-vit", dtype="fp8", cache_dir=cache_dir)


def test_bf16_encoder_returns_float32(cache_dir: Path, pixels: torch.Tensor) -> None:
    encoder = load_encoder("test/tiny-dinov2", dtype="bf16", cache_dir=cache_dir)
    assert next(encoder.model.parameters()).dtype == torch.bfloat16
    out = encoder.encode(pixels[:1], ["cls"])["cls"]
    assert out.dtype == torch.float32
    reference = load_encoder("test/tiny-dinov2", cache_dir=cache_dir).encode(pixels[:1], ["cls"])
    torch.testing.assert_close(out, reference["cls"], rtol=0.1, atol=0.1)


# --- an unreachable hub: offline for the rest of the process ------------------------------------


@pytest.fixture
def unreachable_hub(monkeypatch: pytest.MonkeyPatch) -> None:
    """Online mode against an endpoint that refuses connections (nothing listens on port 9)."""
    from huggingface_hub import constants

    from embedkit.models import loading

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    for proxy in ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy"):
        monkeypatch.delenv(proxy, raising=False)
    monkeypatch.setattr(loading, "_HUB_DOWN", {})
    monkeypatch.setattr(loading, "_HUB_CONFIGS", {})


@pytest.mark.usefixtures("unreachable_hub")
def test_unreachable_hub_fails_fast_once_and_stays_offline(
    cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import time

    import huggingface_hub
    from huggingface_hub import constants

    from embedkit.models import loading

    started = time.monotonic()
    with pytest.raises(ModelLoadError) as info:
        identify_encoder("dinov3-7b", cache_dir=cache_dir)
    assert time.monotonic() - started < 5
    message = str(info.value)
    assert "127.0.0.1:9" in message and "cannot be reached" in message
    assert "stays offline" in message
    assert "not in the local Hugging Face cache" in message
    assert "hf download facebook/dinov3-vit7b16-pretrain-lvd1689m --local-dir" in message
    assert "gated" in message
    assert constants.HF_HUB_OFFLINE and os.environ["HF_HUB_OFFLINE"] == "1"
    assert not loading.hub_reachable()

    # The same model again (a later step of the run) is answered from memory, without the hub.
    calls: list[str] = []
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda *a, **k: calls.append("x"))
    with pytest.raises(ModelLoadError, match="cannot be reached"):
        identify_encoder("dinov3-7b", cache_dir=cache_dir)
    assert calls == []


@pytest.mark.usefixtures("unreachable_hub")
def test_unreachable_hub_keeps_cached_models_working(offline_hub: Path, cache_dir: Path) -> None:
    commit = "d0d0" + "0" * 36
    model = _hub_model(
        "dinov2",
        {"hidden_size": 384, "num_hidden_layers": 1, "num_attention_heads": 6, "patch_size": 14},
    )
    put_in_hub_cache(offline_hub, "facebook/dinov2-small", model, commit)
    encoder = load_encoder("dinov2/small", cache_dir=cache_dir)
    assert encoder.weights_fingerprint == f"commit:{commit}"


def test_hub_config_is_asked_once_per_model(
    offline_hub: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import huggingface_hub

    from embedkit.models import loading

    monkeypatch.setattr(loading, "_HUB_CONFIGS", {})
    model = _hub_model(
        "dinov2",
        {"hidden_size": 384, "num_hidden_layers": 1, "num_attention_heads": 6, "patch_size": 14},
    )
    put_in_hub_cache(offline_hub, "facebook/dinov2-small", model, "e" * 40)
    real = huggingface_hub.hf_hub_download
    calls: list[str] = []

    def counting(*args: Any, **kwargs: Any) -> str:
        calls.append(args[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", counting)
    first = loading.hub_config("facebook/dinov2-small")
    second = loading.hub_config("facebook/dinov2-small")
    assert calls == ["facebook/dinov2-small"]
    assert first is second
