"""The encoder registry: namespaced names (``dinov3/vitb16``) mapped to :class:`EncoderSpec` facts.

A model name given by a user resolves, in this order, to

1. a registered name or alias (``dinov3/vitb16``, ``dinov3-7b``);
2. ``hf-hub:org/name``: always a Hugging Face hub id, even if ``org`` is a registry namespace;
3. an existing local directory holding a ``config.json`` (family from its ``model_type``);
4. ``org/name`` whose ``org`` is not a registry namespace: a hub id not in the registry.

Anything else raises :class:`UnknownModelError` with close matches, compared without letter case
(``DINOv3/ViTB16`` suggests ``dinov3/vitb16``; it is never taken for a hub id).
:func:`resolve` does no network I/O and returns a :class:`HubRef` for case 4, because the spec
of an unregistered hub model can only be built from its ``config.json``:
:func:`~embedkit.models.loading.load_encoder` builds it when it loads the model, and
:func:`get_spec` fetches that config (from the network, or from the Hugging Face cache when
offline).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING

from embedkit.errors import ModelLoadError, ResolutionError, UnknownModelError, did_you_mean
from embedkit.models.families import family_for_model_type, get_family

if TYPE_CHECKING:
    from transformers import PretrainedConfig

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9-]*/[a-z0-9][a-z0-9.+-]*$")
_ALIAS_RE = re.compile(r"^[a-z0-9][a-z0-9.+-]*$")
_HUB_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
HUB_PREFIX = "hf-hub:"


@dataclass(frozen=True, slots=True)
class EncoderSpec:
    """Facts about one encoder; validated when built."""

    name: str
    family: str
    hub_id: str | None
    embed_dim: int
    params: int
    patch_size: int | None
    input_multiple: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    gated: bool
    license: str
    num_register_tokens: int = 0
    aliases: tuple[str, ...] = ()
    tiny_config: Mapping[str, object] | None = field(default=None, hash=False)
    gflops_224: float | None = None
    description: str = ""

    def __post_init__(self) -> None:
        def bad(what: str, got: object) -> ValueError:
            return ValueError(f"EncoderSpec {self.name!r}: expected {what}, got {got!r} instead")

        if not self.name:
            raise bad("a non-empty name", self.name)
        if not self.family:
            raise bad("a family", self.family)
        if self.hub_id is not None and not _HUB_ID_RE.match(self.hub_id):
            raise bad("hub_id of the form 'org/name' or None", self.hub_id)
        for label, value in (("embed_dim", self.embed_dim), ("params", self.params)):
            if not isinstance(value, int) or value <= 0:
                raise bad(f"a positive int {label}", value)
        if not isinstance(self.input_multiple, int) or self.input_multiple <= 0:
            raise bad("a positive int input_multiple", self.input_multiple)
        if self.patch_size is not None:
            if not isinstance(self.patch_size, int) or self.patch_size <= 0:
                raise bad("a positive int patch_size or None", self.patch_size)
            if self.input_multiple % self.patch_size:
                raise bad(
                    f"input_multiple a multiple of patch_size {self.patch_size}",
                    self.input_multiple,
                )
        for label, stats in (("mean", self.mean), ("std", self.std)):
            if len(stats) != 3 or not all(isinstance(v, int | float) for v in stats):
                raise bad(f"three floats for {label}", stats)
        if any(v <= 0 for v in self.std):
            raise bad("a positive std", self.std)
        if self.num_register_tokens < 0:
            raise bad("num_register_tokens >= 0", self.num_register_tokens)
        if isinstance(self.aliases, str):
            raise bad("a tuple of aliases", self.aliases)
        if self.gflops_224 is not None and self.gflops_224 <= 0:
            raise bad("positive gflops_224 or None", self.gflops_224)
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))
        object.__setattr__(self, "aliases", tuple(self.aliases))
        if self.tiny_config is not None:
            object.__setattr__(self, "tiny_config", MappingProxyType(dict(self.tiny_config)))

    @property
    def feature_stride(self) -> int:
        """Input pixels per output token along one side (patch size, or 32 for ConvNeXt)."""
        return self.patch_size if self.patch_size is not None else self.input_multiple


@dataclass(frozen=True, slots=True)
class HubRef:
    """A Hugging Face hub id that is not registered; its spec is built from its config on load."""

    hub_id: str


_SPECS: dict[str, EncoderSpec] = {}
_ALIASES: dict[str, str] = {}


def register(spec: EncoderSpec) -> EncoderSpec:
    """Add ``spec``; a duplicate name or alias, or an unknown family, raises ValueError."""
    if not _NAME_RE.match(spec.name):
        raise ValueError(f"registry name {spec.name!r} must look like 'namespace/name' (lowercase)")
    get_family(spec.family)
    taken = set(_SPECS) | set(_ALIASES)
    for key in (spec.name, *spec.aliases):
        if key in taken:
            raise ValueError(f"model name {key!r} is already registered")
    for alias in spec.aliases:
        if not _ALIAS_RE.match(alias):
            raise ValueError(f"alias {alias!r} must be lowercase without '/'")
    if len(set(spec.aliases)) != len(spec.aliases) or spec.name in spec.aliases:
        raise ValueError(f"{spec.name}: repeated alias in {spec.aliases!r}")
    _SPECS[spec.name] = spec
    _ALIASES.update(dict.fromkeys(spec.aliases, spec.name))
    return spec


def unregister(name: str) -> EncoderSpec:
    """Remove a registered spec (by name) and its aliases; for plug-ins and tests."""
    spec = _SPECS.pop(name)
    for alias in spec.aliases:
        del _ALIASES[alias]
    return spec


def list_specs() -> list[EncoderSpec]:
    """Every registered spec, sorted by name."""
    return [_SPECS[name] for name in sorted(_SPECS)]


def _namespaces() -> set[str]:
    return {name.split("/", 1)[0] for name in _SPECS}


def _unknown(name: str) -> UnknownModelError:
    known = [*_SPECS, *_ALIASES]
    if name.lower() in known:  # the same name in other letter case
        hint = f"; did you mean {name.lower()!r}? (registry names are lowercase)."
    else:
        by_lower = {k.lower(): k for k in known}
        close = did_you_mean(name.lower(), by_lower)
        for lowered, original in by_lower.items():
            close = close.replace(f"'{lowered}'", f"'{original}'")
        hint = close or "."
    return UnknownModelError(
        f"unknown model {name!r}{hint} Run `embedkit models` to list them, or pass a local "
        "directory or a Hugging Face hub id (org/name)"
    )


def resolve(name: str) -> EncoderSpec | HubRef:
    """Resolve a user-given model name without network I/O (see the module docstring)."""
    canonical = _ALIASES.get(name, name)
    if canonical in _SPECS:
        return _SPECS[canonical]
    if name.startswith(HUB_PREFIX):
        hub_id = name[len(HUB_PREFIX) :]
        if not _HUB_ID_RE.match(hub_id):
            raise UnknownModelError(
                f"{name!r}: expected a hub id of the form 'hf-hub:org/name', got {hub_id!r}"
            )
        return HubRef(hub_id)
    path = Path(name).expanduser()
    if path.is_dir():
        return spec_from_directory(path)
    if name.startswith(("/", ".", "~")) or path.exists():
        raise UnknownModelError(
            f"{name!r} is not a model directory (it does not exist or is not a directory); "
            "pass a directory holding config.json and model.safetensors"
        )
    lowered = name.lower()
    if _ALIASES.get(lowered, lowered) in _SPECS:
        raise _unknown(name)  # a registered name in other letter case, not a hub id
    if _HUB_ID_RE.match(name) and name.split("/", 1)[0].lower() not in _namespaces():
        return HubRef(name)
    raise _unknown(name)


def get_spec(name: str, *, revision: str | None = None) -> EncoderSpec:
    """The spec for ``name``.

    A hub id that is not registered is described by its ``config.json``, fetched from the hub (or
    from the Hugging Face cache when offline); failures raise :class:`ModelLoadError`.
    """
    target = resolve(name)
    if isinstance(target, EncoderSpec):
        return target
    from embedkit.models.loading import hub_spec  # loading imports this module

    return hub_spec(target.hub_id, revision=revision)


# --- specs from checkpoints -----------------------------------------------------------------


def read_config_json(directory: Path) -> dict[str, object]:
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise ModelLoadError(
            f"{directory}: no config.json; a model directory holds config.json and "
            "model.safetensors (e.g. made with `hf download REPO --local-dir DIR`)"
        )
    try:
        raw = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{config_path}: cannot read it as JSON ({exc})") from exc
    if not isinstance(raw, dict):
        raise ModelLoadError(f"{config_path}: expected a JSON object, got {type(raw).__name__}")
    return raw


def _normalisation(directory: Path | None) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """image_mean/image_std from preprocessor_config.json when present, else ImageNet's."""
    if directory is not None and (directory / "preprocessor_config.json").is_file():
        try:
            raw = json.loads((directory / "preprocessor_config.json").read_text(encoding="utf-8"))
            mean, std = raw["image_mean"], raw["image_std"]
            if len(mean) == 3 and len(std) == 3:
                return tuple(float(v) for v in mean), tuple(float(v) for v in std)
        except (OSError, ValueError, KeyError, TypeError):
            pass
    return IMAGENET_MEAN, IMAGENET_STD


def spec_from_config(
    config: PretrainedConfig,
    *,
    name: str,
    hub_id: str | None,
    files: Path | None,
    params: int | None = None,
) -> EncoderSpec:
    """A spec built from a transformers config; ``files`` may hold a preprocessor_config.json."""
    adapter = family_for_model_type(config.model_type, where=name)
    facts = adapter.facts(config)
    mean, std = _normalisation(files)
    return EncoderSpec(
        name=name,
        family=adapter.name,
        hub_id=hub_id,
        embed_dim=facts.embed_dim,
        params=params if params is not None else adapter.count_params(config),
        patch_size=facts.patch_size,
        input_multiple=facts.input_multiple,
        mean=(mean[0], mean[1], mean[2]),
        std=(std[0], std[1], std[2]),
        gated=False,
        license="unknown (see the model card)",
        num_register_tokens=facts.num_register_tokens,
        description=f"{config.model_type} checkpoint from {name}",
    )


def spec_from_directory(directory: Path) -> EncoderSpec:
    """The spec of a local checkpoint directory; its ``name`` is the absolute path."""
    directory = directory.expanduser().resolve()
    raw = read_config_json(directory)
    adapter = family_for_model_type(raw.get("model_type"), where=str(directory / "config.json"))
    config = adapter.config_class.from_pretrained(directory)
    return spec_from_config(config, name=str(directory), hub_id=None, files=directory)


# --- resolution ----------------------------------------------------------------------------


def validate_resolution(spec: EncoderSpec, resolution: int, *, snap: bool = False) -> int:
    """``resolution`` if it is a positive multiple of ``spec.input_multiple``.

    Otherwise raise :class:`ResolutionError` naming the nearest valid values, or with
    ``snap=True`` return the nearest valid value (ties round up, never below one multiple).
    """
    step = spec.input_multiple
    if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution <= 0:
        raise ResolutionError(f"expected a positive integer resolution, got {resolution!r}")
    if resolution % step == 0:
        return resolution
    below = resolution // step * step
    above = below + step
    nearest = above if below == 0 or resolution - below >= above - resolution else below
    if snap:
        return nearest
    what = f"patch size {spec.patch_size}" if spec.patch_size == step else f"stride {step}"
    options = f"{above}" if below == 0 else f"{below} or {above}"
    raise ResolutionError(
        f"resolution {resolution} is not a multiple of {step} ({what} of {spec.name}); "
        f"nearest valid: {options}. Pass one of them, or --snap-resolution to use {nearest}"
    )
