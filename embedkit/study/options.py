"""One schema per request: the options `embedkit extract|probe|finetune` and a pipeline step take.

Each option is declared once, as a field of its request dataclass
(:class:`~embedkit.extract.ExtractionRequest`, :class:`~embedkit.probes.request.ProbeRequest`,
:class:`~embedkit.finetune.request.FinetuneRequest`): its name, its type (a closed set is a
``Literal`` owned by the layer that interprets it) and its default. The request validates its
values in ``__post_init__``. From these dataclasses this module derives

- :func:`step_schema`: the pydantic model of a pipeline step (every field but the block's axes
  :data:`IDENTITY`; an unknown key is refused with its key path), and
- :func:`request_from_options`: the one mapping of a dict of options to a request, used by the
  CLI (its parsed options) and by the pipeline runner (a validated step plus the block's axes).

So a new option is one field in its request plus its CLI flag; a test checks that the CLI and
the pipeline steps offer the same options with the same defaults.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationError, create_model

from embedkit.errors import ConfigError, EmbedkitError
from embedkit.extract.request import ExtractionRequest
from embedkit.finetune.request import FinetuneRequest
from embedkit.probes.request import ProbeRequest

__all__ = [
    "IDENTITY",
    "PIPELINE_ALIASES",
    "REQUEST_TYPES",
    "field_defaults",
    "finetune_methods",
    "parse_option",
    "probe_kinds",
    "request_from_options",
    "step_schema",
    "step_values",
]

R = TypeVar("R")

#: The fields a pipeline block sets from its axes (datasets x models x resolutions); on the
#: command line they are required options.
IDENTITY: tuple[str, ...] = ("model", "dataset", "resolution")

#: Every request a CLI command or a pipeline step builds, by command / step name.
REQUEST_TYPES: Mapping[str, type[Any]] = {
    "extract": ExtractionRequest,
    "probe": ProbeRequest,
    "finetune": FinetuneRequest,
}

#: Pipeline keys users already write that differ from the request field names (both work).
PIPELINE_ALIASES: Mapping[type[Any], Mapping[str, str]] = {
    ExtractionRequest: {"workers": "num_workers"},
}


def probe_kinds() -> tuple[str, ...]:
    """The probe kinds a command or a step may name (the probe-kind registry's)."""
    from embedkit.probes import PROBE_KINDS

    return tuple(PROBE_KINDS)


def finetune_methods() -> tuple[str, ...]:
    """The finetuning methods a command may name (the finetune-method registry's)."""
    from embedkit.finetune import METHOD_NAMES

    return tuple(METHOD_NAMES)


def _field_types(request_type: type[Any]) -> dict[str, Any]:
    """Field name -> type, with the registry-backed names a step may use.

    A probe kind is a closed choice (pydantic names the valid ones); a finetuning method is
    checked by the request itself (``get_method``), so that a pipeline reports it together with
    every other problem of the file."""
    hints = get_type_hints(request_type)
    if request_type is ProbeRequest:
        hints["kind"] = Literal.__getitem__(probe_kinds())
    if request_type is FinetuneRequest:
        hints["method"] = str
    return hints


def field_defaults(request_type: type[Any]) -> dict[str, Any]:
    """The request's defaults by field name (required fields are absent)."""
    return {
        f.name: f.default
        for f in dataclasses.fields(request_type)
        if f.default is not dataclasses.MISSING
    }


def step_schema(request_type: type[Any], *, identity: bool = False) -> type[BaseModel]:
    """The pydantic model of a pipeline step building ``request_type``: one field per request
    field (same type and default) except the block's axes :data:`IDENTITY` (with
    ``identity=True``: every field). A field with a :data:`PIPELINE_ALIASES` key is named by
    that key in a step and takes both names. Unknown keys are refused. One model per request
    type."""
    key = (request_type, identity)
    if key not in _SCHEMAS:
        _SCHEMAS[key] = _derive_schema(request_type, identity)
    return _SCHEMAS[key]


_SCHEMAS: dict[tuple[type[Any], bool], type[BaseModel]] = {}


def _derive_schema(request_type: type[Any], identity: bool) -> type[BaseModel]:
    aliases = PIPELINE_ALIASES.get(request_type, {})
    types = _field_types(request_type)
    fields: dict[str, Any] = {}
    for f in dataclasses.fields(request_type):
        if f.name in IDENTITY and not identity:
            continue
        default = ... if f.default is dataclasses.MISSING else f.default
        keys = [key for key, name in aliases.items() if name == f.name]
        info = Field(default, validation_alias=AliasChoices(*keys, f.name)) if keys else default
        # A step names the field as pipelines already write it; the request schema by its name.
        fields[f.name if identity or not keys else keys[0]] = (types[f.name], info)
    if request_type is FinetuneRequest and not identity:
        # Older pipelines put the method-specific options in a mapping; both forms work.
        fields["options"] = (dict[str, Any], Field(default_factory=dict))
    name = request_type.__name__.removesuffix("Request") + ("Options" if identity else "Step")
    return create_model(
        name,
        __config__=ConfigDict(extra="forbid", frozen=True),
        __doc__=f"The options of {request_type.__name__} (derived from its fields).",
        **fields,
    )


def _is_sequence(tp: Any) -> bool:
    """``tuple[X, ...]`` or ``tuple[X, ...] | None``."""
    if get_origin(tp) is tuple:
        return True
    if get_origin(tp) in (Union, type(int | None)):
        return any(_is_sequence(a) for a in get_args(tp))
    return False


def parse_option(request_type: type[Any], name: str, value: Any) -> Any:
    """A command-line value as the schema takes it: a comma-separated string for a sequence
    field (``--ks 10,20,100,200``) becomes a list; an enum member its value."""
    if isinstance(value, str) and _is_sequence(_field_types(request_type).get(name)):
        return [part.strip() for part in value.split(",") if part.strip()]
    return getattr(value, "value", value)


def request_from_options(
    request_type: type[R], options: Mapping[str, Any], *, where: str | None = None
) -> R:
    """The request ``options`` describe (field names, or a pipeline alias; missing fields take
    the request's defaults). Types and closed choices are checked by the schema, values by the
    request; every problem is an :class:`EmbedkitError` (prefixed with ``where``, e.g. a
    pipeline key path, when given)."""
    from embedkit.manifest.loader import format_validation_error

    schema = step_schema(request_type, identity=True)
    given = {key: parse_option(request_type, key, value) for key, value in options.items()}
    try:
        parsed = schema.model_validate(given)
    except ValidationError as exc:
        source = where or "options"
        raise ConfigError(format_validation_error(exc, source=source, root=schema)) from None
    values = {name: getattr(parsed, name) for name in parsed.model_fields_set}
    try:
        return request_type(**values)
    except (EmbedkitError, ValueError, TypeError) as exc:
        if where is not None:
            raise ConfigError(f"{where}: {exc}") from exc
        if isinstance(exc, EmbedkitError):
            raise
        raise ConfigError(str(exc)) from exc


def step_values(step: BaseModel) -> dict[str, Any]:
    """The options a validated step sets, as :func:`request_from_options` takes them (a
    finetune step's ``options`` mapping merged in); what it leaves out takes the request's
    default."""
    values = {name: getattr(step, name) for name in step.model_fields_set}
    nested = values.pop("options", None) or {}
    return {**values, **nested}
