"""Read ``data_manifest.yaml`` into a frozen :class:`Manifest`.

pydantic validates; this module words its errors for people: one line per problem, naming the
file, the dotted location (``datasets.nih-cxr14.labels.seperator``), what was expected and the fix.
"""

from __future__ import annotations

import os
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from embedkit.errors import EmbedkitError, ManifestError, did_you_mean
from embedkit.manifest.schema import DatasetConfig, ManifestFile

DEFAULT_MANIFEST = "data_manifest.yaml"


@dataclass(frozen=True)
class Manifest:
    """The parsed manifest: where it lives, the cache root and the datasets by name."""

    path: Path
    cache: str
    datasets: Mapping[str, DatasetConfig]

    def dataset(self, name: str) -> DatasetConfig:
        """The dataset called ``name``; an unknown name raises ``ManifestError``."""
        try:
            return self.datasets[name]
        except KeyError:
            raise ManifestError(
                f"{self.path.name}: no dataset {name!r}{did_you_mean(name, self.datasets) or '.'} "
                f"Datasets in {self.path}: {', '.join(self.datasets)}"
            ) from None


def load_manifest(path: str | os.PathLike[str] | None = None) -> Manifest:
    """Parse and validate a manifest (default ``./data_manifest.yaml``)."""
    source = Path(path if path is not None else DEFAULT_MANIFEST)
    if not source.is_file():
        hint = (
            "pass the manifest path, or run from the folder that holds data_manifest.yaml"
            if path is None
            else "check the path"
        )
        raise ManifestError(f"{source}: manifest file not found ({hint})")
    try:
        text = source.read_text(encoding="utf-8")
        data = yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as exc:
        raise ManifestError(f"{source}: not valid YAML: {_yaml_problem(exc)}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ManifestError(f"{source}: cannot read the manifest: {exc}") from None
    return parse_manifest(data, path=source)


def read_yaml(source: Path, error: type[EmbedkitError] = ManifestError) -> object:
    """Parse a YAML file, refusing duplicate keys; problems raise ``error`` naming the line."""
    if not source.is_file():
        raise error(f"{source}: file not found")
    try:
        return yaml.load(source.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)
    except yaml.YAMLError as exc:
        raise error(f"{source}: not valid YAML: {_yaml_problem(exc)}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise error(f"{source}: cannot read the file: {exc}") from None


def parse_manifest(data: object, *, path: Path) -> Manifest:
    """Validate already-parsed YAML ``data``; paths resolve against ``path``'s folder."""
    if not isinstance(data, dict):
        raise ManifestError(
            f"{path}: expected a mapping with `datasets:` (and optionally `cache:`), "
            f"got {type(data).__name__}"
        )
    base_dir = Path(os.path.abspath(path)).parent
    try:
        parsed = ManifestFile.model_validate(data, context={"base_dir": base_dir})
    except ValidationError as exc:
        raise ManifestError(format_validation_error(exc, source=str(path))) from None
    datasets = {
        name: DatasetConfig(name=name, **dict(fields)) for name, fields in parsed.datasets.items()
    }
    return Manifest(
        path=Path(os.path.abspath(path)),
        cache=_resolve_cache(parsed.cache, base_dir),
        datasets=types.MappingProxyType(datasets),
    )


def _resolve_cache(cache: str, base_dir: Path) -> str:
    if "://" in cache:
        return cache
    local = Path(cache).expanduser()
    return os.path.abspath(local if local.is_absolute() else base_dir / local)


class _UniqueKeyLoader(yaml.SafeLoader):
    """A SafeLoader that refuses duplicate keys instead of keeping the last one silently."""

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        seen: set[object] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}; keep only one", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _yaml_problem(exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return f"{where}{problem}"


# ---- pydantic errors → sentences ---------------------------------------------------------------


def format_validation_error(
    exc: ValidationError, *, source: str, root: type[BaseModel] | None = None
) -> str:
    """One ``source: location: problem`` line per error; ``root`` is the validated model
    (default: the manifest file), used to name the valid fields of the offending level."""
    lines = [f"{source}: {_describe(error, root or ManifestFile)}" for error in exc.errors()]
    if len(lines) == 1:
        return lines[0]
    return f"{source}: {len(lines)} problems:\n" + "\n".join(f"  {line}" for line in lines)


def _describe(error: Any, root: type[BaseModel]) -> str:
    where, model = _walk(error["loc"], root)
    kind = error["type"]
    value = error.get("input")
    ctx = error.get("ctx") or {}
    if kind == "extra_forbidden":
        key = str(error["loc"][-1])
        valid = list(model.model_fields) if model is not None else []
        hint = did_you_mean(key, valid) or "."
        return f"{where}: unknown field{hint} Valid fields: {', '.join(valid)}"
    if kind == "missing":
        return f"{where}: required field is missing"
    if kind == "union_tag_invalid":
        field = ctx.get("discriminator", "").strip("'")
        choices = ctx.get("expected_tags", "")
        tag = str(ctx.get("tag", ""))
        options = [c.strip(" '") for c in choices.split(",")]
        return (
            f"{where}.{field}: {tag!r} is not a valid choice{did_you_mean(tag, options) or '.'} "
            f"Expected one of {choices}"
        )
    if kind == "union_tag_not_found":
        field = ctx.get("discriminator", "").strip("'")
        return f"{where}.{field}: required field is missing"
    if kind == "literal_error":
        options = [
            o.strip(" '") for o in str(ctx.get("expected", "")).replace(" or ", ",").split(",")
        ]
        return (
            f"{where}: {value!r} is not a valid choice{did_you_mean(str(value), options) or '.'} "
            f"Expected {ctx.get('expected')}"
        )
    if kind == "value_error":
        return f"{where}: {ctx.get('error', error['msg'])}"
    message = str(error["msg"]).replace("Input should be", "expected")
    return f"{where}: {message}, got {type(value).__name__} {value!r}"


def _walk(loc: tuple[int | str, ...], root: type[BaseModel]) -> tuple[str, type[BaseModel] | None]:
    """Dotted location without union tags, and the model that holds the last key."""
    parts: list[str] = []
    current: Any = root
    holder: type[BaseModel] | None = root
    for item in loc:
        members = _model_union(current)
        if members:  # pydantic puts the union tag ('separated', 'patient') in the location
            current = members.get(str(item))
            continue
        if isinstance(item, int) and parts:
            parts[-1] += f"[{item}]"
        else:
            parts.append(str(item))
        holder = current if isinstance(current, type) and issubclass(current, BaseModel) else None
        current = _step(current, item)
    return ".".join(parts) or "(top level)", holder


def _step(current: Any, item: int | str) -> Any:
    if isinstance(current, type) and issubclass(current, BaseModel):
        field = current.model_fields.get(str(item))
        return None if field is None else _unwrap(field.annotation)
    origin = typing.get_origin(current)
    args = typing.get_args(current)
    if origin is dict and len(args) == 2:
        return _unwrap(args[1])
    if origin in (tuple, list) and args:
        return _unwrap(args[0])
    return None


def _unwrap(annotation: Any) -> Any:
    """Drop ``Annotated`` and ``| None``; keep unions of models (they are tagged)."""
    if typing.get_origin(annotation) is typing.Annotated:
        annotation = typing.get_args(annotation)[0]
    if typing.get_origin(annotation) in (types.UnionType, typing.Union):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return _unwrap(args[0])
    return annotation


def _model_union(annotation: Any) -> dict[str, type[BaseModel]]:
    """Tag → model for a tagged union of models, else empty."""
    if typing.get_origin(annotation) not in (types.UnionType, typing.Union):
        return {}
    tagged: dict[str, type[BaseModel]] = {}
    for member in typing.get_args(annotation):
        if not (isinstance(member, type) and issubclass(member, BaseModel)):
            return {}
        for field in member.model_fields.values():
            if typing.get_origin(field.annotation) is typing.Literal:
                for tag in typing.get_args(field.annotation):
                    tagged[str(tag)] = member
                break
    return tagged
