"""The error family: one module, every error also a built-in exception."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import embedkit
from embedkit import errors
from embedkit.errors import EmbedkitError


def _embedkit_error_classes() -> set[type[EmbedkitError]]:
    found: set[type[EmbedkitError]] = set()
    for info in pkgutil.walk_packages(embedkit.__path__, "embedkit."):
        if info.name in {"embedkit.__main__"}:
            continue
        module = importlib.import_module(info.name)
        for _, obj in inspect.getmembers(module, inspect.isclass):
            if issubclass(obj, EmbedkitError) and obj.__module__.startswith("embedkit"):
                found.add(obj)
    return found


def test_every_error_lives_in_errors_and_subclasses_a_builtin() -> None:
    classes = _embedkit_error_classes()
    assert len(classes) > 20  # the walk really reached the package's modules
    for cls in classes:
        assert cls.__module__ == errors.__name__, f"{cls.__name__} is defined in {cls.__module__}"
        if cls is EmbedkitError:
            continue
        builtin_bases = [
            b for b in cls.__mro__[1:] if b.__module__ == "builtins" and b is not Exception
        ]
        assert builtin_bases, f"{cls.__name__} subclasses no built-in exception besides Exception"
        assert cls.__doc__, f"{cls.__name__} has no docstring"
