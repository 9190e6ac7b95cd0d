"""The finetuned network: a registry encoder plus one linear head on its pooled output.

The pooled output is one of the encoder's non-grid poolings (see :mod:`embedkit.models.pooling`):
``mean`` (patch tokens, registers and CLS excluded) by default for ViT families, following the
CXR study's ``last_hidden_state.mean(1)``; ``pooled`` for ConvNeXt families. ``cls`` and
``cls+mean`` are options.
"""

from __future__ import annotations

import torch
from torch import nn

from embedkit.errors import ConfigError
from embedkit.models import (
    EncoderSpec,
    available_poolings,
    derived_components,
    get_family,
    pool,
)

__all__ = ["Classifier", "EncoderHead", "default_pooling", "head_dim"]

#: Poolings a head can sit on, in order of preference for the default.
_DEFAULT_ORDER = ("pooled", "mean")


def default_pooling(spec: EncoderSpec) -> str:
    """``pooled`` when the family offers it (ConvNeXt), else the mean of patch tokens (ViT)."""
    offered = available_poolings(spec)
    return next(p for p in _DEFAULT_ORDER if p in offered)


def head_dim(spec: EncoderSpec, pooling: str) -> int:
    """Width of the head input for ``pooling``; a grid or unknown pooling is a ConfigError."""
    offered = [p for p in available_poolings(spec) if p != "patch"]
    if pooling not in offered:
        raise ConfigError(
            f"pooling {pooling!r} cannot feed a linear head of {spec.name}; "
            f"choose one of {', '.join(offered)}"
        )
    return spec.embed_dim * len(derived_components(pooling))


class EncoderHead(nn.Module):
    """A registry encoder with a trainable ``head``: what a finetuning method prepares (its
    parameters are named ``encoder.*`` and ``head.*``)."""

    head: nn.Module

    def __init__(self, encoder: nn.Module, spec: EncoderSpec):
        super().__init__()
        self.encoder = encoder
        self.spec = spec


class Classifier(EncoderHead):
    """``head(pool(encoder(pixels)))``: logits of shape (B, n_outputs)."""

    head: nn.Linear

    def __init__(self, encoder: nn.Module, spec: EncoderSpec, n_outputs: int, pooling: str):
        super().__init__(encoder, spec)
        self.pooling = pooling
        self.head = nn.Linear(head_dim(spec, pooling), n_outputs)
        nn.init.normal_(self.head.weight, std=0.01)
        nn.init.zeros_(self.head.bias)

    def features(self, pixels: torch.Tensor) -> torch.Tensor:
        adapter = get_family(self.spec.family)
        outputs = adapter.forward(self.encoder, pixels, self.spec)
        tokens = adapter.tokens(outputs, self.spec, (int(pixels.shape[2]), int(pixels.shape[3])))
        return pool(tokens, [self.pooling])[self.pooling]

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        features = self.features(pixels)
        logits: torch.Tensor = self.head(features.to(self.head.weight.dtype))
        return logits
