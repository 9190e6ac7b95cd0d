"""Encoders: the registry of named models, per-family adapters, loading and pooling.

Exports load lazily (:mod:`embedkit.lazy`): ``from embedkit.models import EncoderSpec`` imports
the registry, not torch or transformers. The shipped entries are registered on import.
"""

from typing import TYPE_CHECKING

from embedkit.models import catalog as _catalog  # registers the shipped entries (torch-free)

if TYPE_CHECKING:
    from embedkit.models.families import FamilyAdapter, Tokens, get_family, list_families
    from embedkit.models.listing import render_specs, spec_summary
    from embedkit.models.loading import (
        EncoderIdentity,
        LoadedEncoder,
        identify_encoder,
        load_encoder,
        weights_fingerprint,
    )
    from embedkit.models.pooling import (
        DERIVED_POOLINGS,
        UnknownPoolingError,
        available_poolings,
        derive,
        derived_components,
        pool,
        pooling_dims,
        stored_poolings,
    )
    from embedkit.models.registry import (
        EncoderSpec,
        HubRef,
        get_spec,
        list_specs,
        register,
        resolve,
        validate_resolution,
    )
else:
    from embedkit.lazy import lazy_exports

    __getattr__, __dir__ = lazy_exports(
        __name__,
        {
            "families": ("FamilyAdapter", "Tokens", "get_family", "list_families"),
            "listing": ("render_specs", "spec_summary"),
            "loading": (
                "EncoderIdentity",
                "LoadedEncoder",
                "identify_encoder",
                "load_encoder",
                "weights_fingerprint",
            ),
            "pooling": (
                "DERIVED_POOLINGS",
                "UnknownPoolingError",
                "available_poolings",
                "derive",
                "derived_components",
                "pool",
                "pooling_dims",
                "stored_poolings",
            ),
            "registry": (
                "EncoderSpec",
                "HubRef",
                "get_spec",
                "list_specs",
                "register",
                "resolve",
                "validate_resolution",
            ),
        },
    )

del _catalog

__all__ = [
    "DERIVED_POOLINGS",
    "EncoderIdentity",
    "EncoderSpec",
    "FamilyAdapter",
    "HubRef",
    "LoadedEncoder",
    "Tokens",
    "UnknownPoolingError",
    "available_poolings",
    "derive",
    "derived_components",
    "get_family",
    "get_spec",
    "identify_encoder",
    "list_families",
    "list_specs",
    "load_encoder",
    "pool",
    "pooling_dims",
    "register",
    "render_specs",
    "resolve",
    "spec_summary",
    "stored_poolings",
    "validate_resolution",
    "weights_fingerprint",
]
