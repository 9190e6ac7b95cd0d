from __future__ import annotations

import pytest
import torch

from embedkit import models, store
from embedkit.errors import ResolutionError
from embedkit.models import (
    Tokens,
    UnknownPoolingError,
    available_poolings,
    derive,
    derived_components,
    get_family,
    get_spec,
    list_families,
    list_specs,
    pool,
    pooling_dims,
)
from embedkit.models import pooling as models_pooling
from embedkit.models.pooling import check_poolings


def _tokens(with_cls: bool) -> Tokens:
    generator = torch.Generator().manual_seed(0)
    patches = torch.randn(2, 3, 4, 5, generator=generator)
    head = torch.randn(2, 5, generator=generator)
    return Tokens(
        cls=head if with_cls else None, pooled=None if with_cls else head, patches=patches
    )


def test_derived_components() -> None:
    assert derived_components("cls+mean") == ("cls", "mean")
    assert derived_components("cls") == ("cls",)
    assert derived_components("pooled") == ("pooled",)
    with pytest.raises(
        UnknownPoolingError, match=r"'cls\+mean', 'mean', 'patch', 'pooled'"
    ) as info:
        derived_components("gem")
    assert isinstance(info.value, ValueError)


def test_pool_vit_tokens() -> None:
    tokens = _tokens(with_cls=True)
    out = pool(tokens, ["cls", "mean", "patch", "cls+mean"])
    assert tokens.cls is not None
    torch.testing.assert_close(out["cls"], tokens.cls, rtol=0, atol=0)
    torch.testing.assert_close(out["mean"], tokens.patches.reshape(2, 12, 5).mean(1))
    assert out["patch"].shape == (2, 3, 4, 5)
    assert out["patch"].is_contiguous()
    torch.testing.assert_close(out["cls+mean"], torch.cat([out["cls"], out["mean"]], dim=1))
    assert out["cls+mean"].shape == (2, 10)


def test_pool_convnext_tokens_has_no_cls() -> None:
    tokens = _tokens(with_cls=False)
    out = pool(tokens, ["pooled", "mean"])
    assert tokens.pooled is not None
    assert torch.equal(out["pooled"], tokens.pooled)
    with pytest.raises(UnknownPoolingError, match=r"'cls' is not available.*'pooled'"):
        pool(tokens, ["cls"])
    with pytest.raises(UnknownPoolingError, match="'cls' is not available"):
        pool(tokens, ["cls+mean"])


def test_derive_from_stored_features() -> None:
    stored = {"cls": torch.ones(3, 4), "mean": torch.zeros(3, 4)}
    both = derive("cls+mean", stored)
    assert both.shape == (3, 8)
    assert torch.equal(both[:, :4], stored["cls"])
    assert torch.equal(both[:, 4:], stored["mean"])
    assert derive("cls", stored) is stored["cls"]
    with pytest.raises(UnknownPoolingError, match="'mean' is not stored"):
        derive("cls+mean", {"cls": stored["cls"]})


def test_available_poolings_per_family() -> None:
    assert available_poolings(get_spec("dinov3/vitb16")) == ("cls", "mean", "patch", "cls+mean")
    assert available_poolings(get_spec("dinov3/convnext-base")) == (
        "pooled",
        "mean",
        "patch",
        "pooled+mean",
    )


def test_one_derived_poolings_table() -> None:
    """The models layer serves the store's table (no copy of its own to drift)."""
    assert models_pooling.DERIVED_POOLINGS is store.DERIVED_POOLINGS
    assert models.DERIVED_POOLINGS is store.DERIVED_POOLINGS


@pytest.mark.parametrize("family", [f.name for f in list_families()])
def test_pooled_plus_mean_is_offered_by_every_family_storing_pooled_and_mean(family: str) -> None:
    adapter = get_family(family)
    spec = next(s for s in list_specs() if s.family == family)
    offered = available_poolings(spec)
    if {"pooled", "mean"} <= set(adapter.stored_poolings):
        assert "pooled+mean" in offered
        assert check_poolings(spec, ["pooled+mean"]) == ("pooled+mean",)
        side = spec.input_multiple * 7
        assert pooling_dims(spec, ["pooled+mean"], resolution=side) == {
            "pooled+mean": (2 * spec.embed_dim,)
        }
    else:
        assert "pooled+mean" not in offered
    for name, parts in store.DERIVED_POOLINGS.items():
        assert (name in offered) == (set(parts) <= set(adapter.stored_poolings))


def test_pool_convnext_tokens_pooled_plus_mean() -> None:
    tokens = _tokens(with_cls=False)
    out = pool(tokens, ["pooled+mean"])
    assert tokens.pooled is not None
    want = torch.cat([tokens.pooled, tokens.patches.mean(dim=(1, 2))], dim=1)
    torch.testing.assert_close(out["pooled+mean"], want)


@pytest.mark.parametrize(
    ("name", "resolution", "expected"),
    [
        ("dinov3/vitb16", 224, {"cls": (768,), "cls+mean": (1536,), "patch": (14, 14, 768)}),
        ("dinov3/vitb16", 512, {"cls": (768,), "cls+mean": (1536,), "patch": (32, 32, 768)}),
        ("dinov2/giant", 518, {"cls": (1536,), "cls+mean": (3072,), "patch": (37, 37, 1536)}),
    ],
)
def test_pooling_dims(name: str, resolution: int, expected: dict[str, tuple[int, ...]]) -> None:
    assert pooling_dims(get_spec(name), expected, resolution=resolution) == expected


def test_pooling_dims_convnext_and_errors() -> None:
    spec = get_spec("dinov3/convnext-base")
    dims = pooling_dims(spec, ["pooled", "mean", "patch"], resolution=512)
    assert dims == {"pooled": (1024,), "mean": (1024,), "patch": (16, 16, 1024)}
    with pytest.raises(UnknownPoolingError, match="not available for dinov3/convnext-base"):
        pooling_dims(spec, ["cls+mean"], resolution=224)
    with pytest.raises(ResolutionError):
        pooling_dims(spec, ["pooled"], resolution=500)
    with pytest.raises(UnknownPoolingError, match="at least one"):
        pooling_dims(spec, [], resolution=224)
