"""The extraction engine: stored features, cache keys, reuse, bad images."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import embedkit.extract.runner as extract_mod
from embedkit.data.readers import read_image
from embedkit.data.transforms import Preprocessing
from embedkit.errors import BadImagesError, EmbedkitError, IncompleteEntryError
from embedkit.extract import ExtractionRequest, extract, plan_extraction
from embedkit.manifest import load_manifest
from embedkit.models import identify_encoder, load_encoder
from embedkit.store import FeatureEntry

from ..conftest import write_manifest


def _request(model: str = "test/tiny-dinov3-vit", **kw: object) -> ExtractionRequest:
    base: dict[str, object] = {
        "model": model,
        "dataset": "demo",
        "resolution": 224,
        "batch_size": 4,
        "num_workers": 0,
        "unit_rows": 8,
        "device": "cpu",
    }
    base.update(kw)
    return ExtractionRequest(**base)  # type: ignore[arg-type]


def _direct_forward(
    model: str, manifest: Path, model_cache: Path, size: int
) -> dict[str, np.ndarray]:
    """The reference: our own forward pass over the same preprocessed pixels, sliced by hand."""
    table = load_manifest(manifest).dataset("demo").load()
    enc = load_encoder(model, cache_dir=model_cache)
    pre = Preprocessing(size=size, mean=enc.spec.mean, std=enc.spec.std)
    pixels = torch.stack([pre(read_image(p)) for p in table.paths])
    with torch.inference_mode():
        out = enc.model(pixel_values=pixels)
    hidden = out.last_hidden_state
    if enc.spec.family == "dinov3-convnext":
        return {"pooled": out.pooler_output.numpy(), "mean": hidden[:, 1:].mean(1).numpy()}
    first_patch = 1 + enc.spec.num_register_tokens
    return {"cls": hidden[:, 0].numpy(), "mean": hidden[:, first_patch:].mean(1).numpy()}


@pytest.mark.parametrize(
    "model", ["test/tiny-dinov3-vit", "test/tiny-dinov3-convnext", "test/tiny-dinov2"]
)
def test_stored_features_equal_a_direct_forward_pass(
    model: str, demo_manifest: Path, model_cache: Path
) -> None:
    result = extract(_request(model), manifest=demo_manifest, model_cache_dir=model_cache)
    entry = result.entry
    assert entry.is_complete and not result.reused
    assert result.images_computed == 24 and result.computed_units == 3
    reference = _direct_forward(model, demo_manifest, model_cache, 224)
    for name, ref in reference.items():
        stored = entry.read(name)
        assert stored.dtype == np.float16 and stored.shape == ref.shape
        # Stored = float16 of the float32 features; batch composition may move the last ulp.
        np.testing.assert_allclose(stored.astype(np.float32), ref, rtol=2e-3, atol=2e-3)
    if "cls" in reference:
        both = entry.read("cls+mean")
        np.testing.assert_array_equal(
            both, np.concatenate([entry.read("cls"), entry.read("mean")], 1)
        )


def test_existing_entry_is_reused_without_loading_the_model(
    demo_manifest: Path, model_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = extract(_request(), manifest=demo_manifest, model_cache_dir=model_cache)

    def boom(*_a: object, **_k: object) -> None:
        raise AssertionError("the encoder must not be loaded for a cache hit")

    monkeypatch.setattr(extract_mod, "load_encoder", boom)
    second = extract(_request(), manifest=demo_manifest, model_cache_dir=model_cache)
    assert second.reused and second.computed_units == 0
    assert second.entry.key == first.entry.key
    np.testing.assert_array_equal(second.entry.read("cls"), first.entry.read("cls"))


def test_cache_key_changes_with_each_field_and_not_otherwise(
    demo_data: Path, demo_manifest: Path, model_cache: Path, tmp_path: Path
) -> None:
    man = load_manifest(demo_manifest)

    def digest(request: ExtractionRequest, manifest: object = man) -> str:
        ident = identify_encoder(request.model, cache_dir=model_cache)
        return plan_extraction(request, manifest, ident).key.digest()  # type: ignore[arg-type]

    base = _request()
    assert digest(base) == digest(_request())
    # Not in the key: how the work is scheduled.
    # Not in the key either: the storage codec (same stored values, other files).
    unkeyed = ({"batch_size": 2}, {"num_workers": 1}, {"unit_rows": 4}, {"overwrite": True})
    for same in (*unkeyed, {"compression": "zstd"}):
        assert digest(dataclasses.replace(base, **same)) == digest(base), same
    variants = [
        {"resolution": 256},
        {"resize": "pad"},
        {"storage_dtype": "float32"},
        {"patch_tokens": True},
        {"dtype": "bf16"},
        {"model": "test/tiny-dinov2-reg"},
    ]
    digests = {digest(dataclasses.replace(base, **v)) for v in variants}  # type: ignore[arg-type]
    assert len(digests) == len(variants) and digest(base) not in digests
    # Image content: re-encoding one file changes its size and so the key.
    copy = tmp_path / "copy"
    shutil.copytree(demo_data / "images", copy / "images")
    shutil.copy(demo_data / "index.csv", copy / "index.csv")
    copy_manifest = load_manifest(write_manifest(copy, cache=str(tmp_path / "c")))
    assert digest(base, copy_manifest) == digest(base)
    mask = next((copy / "images").rglob("*_mask.png"))  # label maps are not encoded
    mask.write_bytes(mask.read_bytes() + b"\0")
    assert digest(base, copy_manifest) == digest(base)
    victim = next(p for p in (copy / "images").rglob("*.png") if not p.name.endswith("_mask.png"))
    victim.write_bytes(victim.read_bytes() + b"\0")
    assert digest(base, copy_manifest) != digest(base)


def test_a_zstd_entry_holds_the_same_features_as_an_uncompressed_one(
    demo_manifest: Path, model_cache: Path, tmp_path: Path
) -> None:
    plain = extract(_request(), manifest=demo_manifest, model_cache_dir=model_cache).entry
    packed = extract(
        _request(compression="zstd"),
        manifest=demo_manifest,
        cache=tmp_path / "zstd-cache",
        model_cache_dir=model_cache,
    ).entry
    assert plain.key == packed.key
    assert (plain.attrs["compression"]["name"], packed.attrs["compression"]["name"]) == (
        "none",
        "zstd",
    )
    meta = json.loads((Path(packed.uri) / "cls" / "zarr.json").read_text())
    assert [c["name"] for c in meta["codecs"]][-1] == "zstd"
    for pooling in ("cls", "mean"):
        np.testing.assert_array_equal(packed.read(pooling), plain.read(pooling))
    assert packed.verify() == []


def test_patch_tokens_are_stored_as_a_float16_grid(demo_manifest: Path, model_cache: Path) -> None:
    entry = extract(
        _request(patch_tokens=True, storage_dtype="float32"),
        manifest=demo_manifest,
        model_cache_dir=model_cache,
    ).entry
    grid = entry.read("patch")
    assert grid.shape == (24, 14, 14, 32) and grid.dtype == np.float16
    assert entry.read("cls").dtype == np.float32
    # The mean pooling is the mean of the stored grid (up to float16 rounding of the grid).
    np.testing.assert_allclose(
        grid.astype(np.float32).mean(axis=(1, 2)), entry.read("mean"), rtol=1e-2, atol=1e-2
    )


@pytest.fixture
def broken_copy(demo_data: Path, tmp_path: Path) -> tuple[Path, list[str]]:
    """A copy of the demo data where two images (in different units) are corrupt."""
    copy = tmp_path / "broken"
    shutil.copytree(demo_data / "images", copy / "images")
    shutil.copy(demo_data / "index.csv", copy / "index.csv")
    table = (
        load_manifest(write_manifest(copy, cache=str(tmp_path / "cache"))).dataset("demo").load()
    )
    bad = [table.ids[1], table.ids[17]]
    for image_id in bad:
        path = table.paths[table.ids.index(image_id)]
        path.write_bytes(path.read_bytes()[:200])  # truncated PNG
    return copy / "manifest.yaml", bad


def test_bad_images_fail_after_listing_all_and_keep_the_good_units(
    broken_copy: tuple[Path, list[str]], model_cache: Path
) -> None:
    manifest, bad = broken_copy
    with pytest.raises(BadImagesError) as info:
        extract(_request(), manifest=manifest, model_cache_dir=model_cache)
    assert [i for i, _ in info.value.failures] == bad
    assert "2 of 24 images could not be read" in str(info.value)
    root = load_manifest(manifest).cache
    from embedkit.store import CacheRoot, list_entries

    (summary,) = list_entries(CacheRoot.from_uri(root))
    assert not summary.complete and summary.units_done == 1  # units 0 and 2 hold a bad image
    with pytest.raises(IncompleteEntryError, match="1 of 3 units"):
        FeatureEntry.open(CacheRoot.from_uri(root), summary.relpath)


def test_bad_images_skipped_are_recorded(
    broken_copy: tuple[Path, list[str]], model_cache: Path
) -> None:
    manifest, bad = broken_copy
    result = extract(_request(on_bad_image="skip"), manifest=manifest, model_cache_dir=model_cache)
    entry = result.entry
    assert entry.is_complete
    assert [i for i, _ in entry.skipped()] == bad
    valid = entry.valid_mask()
    assert valid.sum() == 22 and not valid[1] and not valid[17]
    assert np.all(entry.read("cls")[~valid] == 0)


def test_device_map_auto_loads_through_accelerate_and_gives_the_same_features(
    demo_manifest: Path, model_cache: Path, tmp_path: Path
) -> None:
    enc = load_encoder("test/tiny-dinov3-vit", cache_dir=model_cache, device_map="auto")
    assert enc.device.type == "cpu"  # no GPU here: accelerate keeps every layer on the CPU
    plain = extract(_request(), manifest=demo_manifest, model_cache_dir=model_cache).entry
    mapped = extract(
        _request(device_map="auto"),
        manifest=demo_manifest,
        cache=tmp_path / "mapped",
        model_cache_dir=model_cache,
    ).entry
    assert mapped.key == plain.key  # layer placement does not change what is stored
    np.testing.assert_array_equal(mapped.read("cls+mean"), plain.read("cls+mean"))


def test_device_map_and_shard_are_exclusive() -> None:
    with pytest.raises(EmbedkitError, match="two ways to split a model"):
        _request(device_map="auto", shard="fsdp")


@pytest.mark.parametrize("model", ["test/tiny-dinov3-vit", "test/tiny-dinov2", "test/tiny-vit"])
def test_vit_encoders_use_sdpa_attention(model: str, model_cache: Path) -> None:
    """Fused scaled-dot-product attention (the GPU throughput path) is what transformers picks."""
    enc = load_encoder(model, cache_dir=model_cache)
    assert enc.model.config._attn_implementation == "sdpa"  # type: ignore[union-attr]
