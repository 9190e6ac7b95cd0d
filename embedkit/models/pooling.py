"""Poolings: per-image features computed from :class:`~embedkit.models.families.Tokens`.

*Stored* poolings come from one forward pass (per family, see ``FamilyAdapter.stored_poolings``):

- ``cls``: the CLS token (ViT families);
- ``pooled``: the pooler output (ConvNeXt families);
- ``mean``: the mean of the patch / feature-map tokens, registers excluded;
- ``patch``: the token grid, ``(h, w, D)`` per image.

*Derived* poolings are computed from stored ones without re-running the model, by concatenation
along the feature axis: ``cls+mean`` = concat(cls, mean), the DINOv2/DINOv3 linear-evaluation
input, and ``pooled+mean`` for ConvNeXt families. The table is the store's
(:data:`embedkit.store.DERIVED_POOLINGS`, which serves them from stored arrays); a family offers a
derived pooling when it stores all of its components.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

from embedkit.errors import UnknownPoolingError
from embedkit.models.families import Tokens, get_family
from embedkit.models.registry import EncoderSpec, validate_resolution
from embedkit.store import DERIVED_POOLINGS

__all__ = [
    "DERIVED_POOLINGS",
    "GRID_POOLINGS",
    "UnknownPoolingError",
    "available_poolings",
    "check_poolings",
    "derive",
    "derived_components",
    "pool",
    "pooling_dims",
    "stored_poolings",
]

GRID_POOLINGS = frozenset({"patch"})


def stored_poolings(spec: EncoderSpec) -> tuple[str, ...]:
    """The poolings one forward pass of this encoder yields."""
    return get_family(spec.family).stored_poolings


def available_poolings(spec: EncoderSpec) -> tuple[str, ...]:
    """Stored poolings, then the derived ones whose components are all stored."""
    stored = stored_poolings(spec)
    derived = tuple(n for n, parts in DERIVED_POOLINGS.items() if set(parts) <= set(stored))
    return stored + derived


def _all_names() -> list[str]:
    from embedkit.models.families import list_families

    names = {n for family in list_families() for n in family.stored_poolings}
    return sorted(names | set(DERIVED_POOLINGS))


def _quoted(names: Iterable[str]) -> str:
    return ", ".join(f"'{n}'" for n in names)


def derived_components(name: str) -> tuple[str, ...]:
    """The stored poolings ``name`` is computed from: ``"cls+mean"`` -> ``("cls", "mean")``."""
    if name in DERIVED_POOLINGS:
        return DERIVED_POOLINGS[name]
    valid = _all_names()
    if name in valid:
        return (name,)
    raise UnknownPoolingError(f"unknown pooling {name!r}; choose one of {_quoted(valid)}")


def check_poolings(spec: EncoderSpec, poolings: Iterable[str]) -> tuple[str, ...]:
    """Validate ``poolings`` for ``spec``; returns them as a tuple without duplicates."""
    names = tuple(dict.fromkeys(poolings))
    if not names:
        raise UnknownPoolingError("expected at least one pooling, got none")
    offered = available_poolings(spec)
    for name in names:
        derived_components(name)  # unknown anywhere -> lists every valid name
        if name not in offered:
            raise UnknownPoolingError(
                f"pooling {name!r} is not available for {spec.name} (family {spec.family}); "
                f"choose one of {_quoted(offered)}"
            )
    return names


def _stored_from_tokens(tokens: Tokens, name: str) -> torch.Tensor:
    if name == "cls" and tokens.cls is not None:
        return tokens.cls
    if name == "pooled" and tokens.pooled is not None:
        return tokens.pooled
    if name == "mean":
        return tokens.patches.mean(dim=(1, 2))
    if name == "patch":
        return tokens.patches.contiguous()
    have = [n for n, t in (("cls", tokens.cls), ("pooled", tokens.pooled)) if t is not None]
    raise UnknownPoolingError(
        f"pooling {name!r} is not available for this encoder's output; "
        f"choose one of {_quoted([*have, 'mean', 'patch'])}"
    )


def derive(name: str, stored: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Compute pooling ``name`` from already stored poolings (a stored name is returned as is)."""
    parts = derived_components(name)
    missing = [p for p in parts if p not in stored]
    if missing:
        raise UnknownPoolingError(
            f"pooling {name!r} needs {_quoted(parts)}, but {_quoted(missing)} is not stored; "
            f"stored: {_quoted(stored)}"
        )
    if len(parts) == 1:
        return stored[parts[0]]
    return torch.cat([stored[p] for p in parts], dim=1)


def pool(tokens: Tokens, poolings: Iterable[str]) -> dict[str, torch.Tensor]:
    """Features for each requested pooling (stored or derived), batch first."""
    names = tuple(dict.fromkeys(poolings))
    for name in names:
        derived_components(name)
    needed = dict.fromkeys(p for name in names for p in derived_components(name))
    stored = {p: _stored_from_tokens(tokens, p) for p in needed}
    return {name: derive(name, stored) for name in names}


def pooling_dims(
    spec: EncoderSpec, poolings: Iterable[str], *, resolution: int
) -> dict[str, tuple[int, ...]]:
    """Per-image shape of each pooling at ``resolution``: ``(D,)``, ``(2D,)`` or ``(h, w, D)``."""
    names = check_poolings(spec, poolings)
    side = validate_resolution(spec, resolution) // spec.feature_stride
    dims: dict[str, tuple[int, ...]] = {}
    for name in names:
        if name in GRID_POOLINGS:
            dims[name] = (side, side, spec.embed_dim)
        else:
            dims[name] = (spec.embed_dim * len(derived_components(name)),)
    return dims
