"""Finetuning methods: which parameters of an encoder with a head (:class:`EncoderHead`: a
classifier or a segmenter) train.

A registry maps a method name to a :class:`Method`: ``prepare`` freezes the whole network, then
unfreezes (or adds) what the method trains (the head always trains); ``record_params`` names the
method's own settings for the result record (they are part of the run id); ``packages`` lists
the packages whose versions the record notes. The train loop asks the method, never its name.

- ``full``: every parameter (DINOv2 radiology study: backbone lr 1e-5);
- ``lora``: low-rank adapters (``peft``) on the family's target modules
  (:attr:`~embedkit.models.families.FamilyAdapter.lora_targets`); defaults from the later CXR
  study: r 16, alpha 16, dropout 0.05 on the q/v projections;
- ``bitfit``: the biases of the encoder;
- ``linear``: nothing in the encoder (a linear probe trained end to end with augmentation).

Adding a method: write its ``prepare`` (and ``record_params`` if it has settings) and add one
:func:`register_method` call below; :data:`METHOD_NAMES` is what the CLI and pipelines offer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeAlias

from embedkit.errors import ConfigError, did_you_mean
from embedkit.models import get_family

if TYPE_CHECKING:  # torch and peft load where a method runs, not with the registry
    from torch import nn

    from embedkit.finetune.model import EncoderHead
    from embedkit.models import EncoderSpec

__all__ = [
    "METHODS",
    "METHOD_NAMES",
    "LoraSettings",
    "Method",
    "count_parameters",
    "get_method",
    "lora_targets",
    "register_method",
]


@dataclass(frozen=True, slots=True)
class LoraSettings:
    """LoRA hyper-parameters; ``targets=None`` means the family's default
    (:attr:`~embedkit.models.families.FamilyAdapter.lora_targets`)."""

    r: int = 16
    alpha: int = 16
    dropout: float = 0.05
    targets: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.r < 1 or self.alpha <= 0 or not 0 <= self.dropout < 1:
            raise ConfigError(
                f"Expected LoRA r >= 1, alpha > 0 and 0 <= dropout < 1, got r={self.r}, "
                f"alpha={self.alpha}, dropout={self.dropout} instead"
            )
        if self.targets is not None and not self.targets:
            raise ConfigError("Expected at least one LoRA target module, got none")


#: Freeze the network, then unfreeze (or add) what the method trains.
Prepare: TypeAlias = "Callable[[EncoderHead, LoraSettings], None]"
#: The method's own settings as recorded in the result's params (part of the run id).
RecordParams: TypeAlias = "Callable[[EncoderSpec, LoraSettings], dict[str, Any]]"


def _no_params(_spec: EncoderSpec, _settings: LoraSettings) -> dict[str, Any]:
    return {}


@dataclass(frozen=True, slots=True)
class Method:
    """One finetuning method: what trains, and what its records say about it."""

    name: str
    description: str
    default_lr: float
    prepare: Prepare
    record_params: RecordParams = _no_params
    packages: tuple[str, ...] = ()  # packages whose versions its records note


METHODS: dict[str, Method] = {}


def register_method(method: Method) -> Method:
    if method.name in METHODS:
        raise ValueError(f"finetuning method {method.name!r} is already registered")
    METHODS[method.name] = method
    return method


def get_method(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise ConfigError(
            f"unknown finetuning method {name!r}{did_you_mean(name, METHODS) or '.'} "
            f"Methods: {', '.join(METHODS)}"
        ) from None


def count_parameters(model: nn.Module) -> dict[str, int]:
    """Trainable and total parameter counts."""
    params = list(model.parameters())
    return {
        "trainable": sum(p.numel() for p in params if p.requires_grad),
        "total": sum(p.numel() for p in params),
    }


def _train_only(model: EncoderHead, keep: Callable[[str], bool]) -> None:
    for name, param in model.named_parameters():
        param.requires_grad_(name.startswith("head.") or keep(name))


def _full(model: EncoderHead, _lora: LoraSettings) -> None:
    _train_only(model, lambda _name: True)


def _linear(model: EncoderHead, _lora: LoraSettings) -> None:
    _train_only(model, lambda _name: False)


def _bitfit(model: EncoderHead, _lora: LoraSettings) -> None:
    _train_only(model, lambda name: name.endswith(".bias"))


def lora_targets(family: str, settings: LoraSettings) -> tuple[str, ...]:
    """The modules LoRA adapts: ``settings.targets``, else the family adapter's default."""
    if settings.targets is not None:
        return settings.targets
    return get_family(family).lora_targets


def _lora_params(spec: EncoderSpec, settings: LoraSettings) -> dict[str, Any]:
    return {
        "lora": {
            "r": settings.r,
            "alpha": settings.alpha,
            "dropout": settings.dropout,
            "targets": list(lora_targets(spec.family, settings)),
        }
    }


def _lora(model: EncoderHead, settings: LoraSettings) -> None:
    from peft import LoraConfig, inject_adapter_in_model
    from torch import nn

    targets = lora_targets(model.spec.family, settings)
    config = LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=list(targets),
        bias="none",
    )
    try:
        inject_adapter_in_model(config, model.encoder)
    except ValueError as exc:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.encoder.named_modules()
                         if isinstance(m, nn.Linear)})  # fmt: skip
        raise ConfigError(
            f"LoRA targets {list(targets)} do not fit {model.spec.name} ({exc}); "
            f"its linear layers are named: {', '.join(linear)}"
        ) from exc
    _train_only(model, lambda name: ".lora_" in name)


for _method in (
    Method("full", "every parameter trains", 1e-5, _full),
    Method("lora", "LoRA adapters (peft) + head", 1e-4, _lora, _lora_params, ("peft",)),
    Method("bitfit", "encoder biases + head", 1e-3, _bitfit),
    Method("linear", "head only (encoder frozen)", 1e-3, _linear),
):
    register_method(_method)
del _method

#: The registered method names, in registration order (the CLI's and pipelines' choices).
METHOD_NAMES: tuple[str, ...] = tuple(METHODS)
