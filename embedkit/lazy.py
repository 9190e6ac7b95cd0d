"""Lazy package exports (PEP 562): a package names what it exports, a submodule loads on first use.

A package ``__init__`` that imported every submodule would make ``import embedkit.<package>``
(and so every CLI start) pay for torch, transformers, scipy and pandas. Instead it declares its
exports once, per submodule, and imports them for the type checker only::

    from typing import TYPE_CHECKING

    if TYPE_CHECKING:
        from embedkit.models.registry import EncoderSpec, get_spec
    else:
        from embedkit.lazy import lazy_exports

        __getattr__, __dir__ = lazy_exports(__name__, {"registry": ("EncoderSpec", "get_spec")})

    __all__ = ["EncoderSpec", "get_spec"]

``from embedkit.models import EncoderSpec`` then imports :mod:`embedkit.models.registry` (and what
it needs), nothing else. Keeping ``__getattr__`` out of the type checker's view means mypy still
reports a misspelt name instead of typing it as ``Any``; ``tests/test_lazy.py`` checks that the
``TYPE_CHECKING`` imports, the table and ``__all__`` agree.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Iterable, Mapping
from typing import Any

__all__ = ["lazy_exports"]


def lazy_exports(
    package: str, exports: Mapping[str, Iterable[str]]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """The ``__getattr__`` and ``__dir__`` of ``package`` that load its exports on first access.

    ``exports`` maps a submodule name (relative to ``package``, without the dot) to the names it
    provides; a name listed twice is an error. A loaded name is stored in the package's namespace,
    so later lookups do not come back here.
    """
    table: dict[str, str] = {}
    for submodule, names in exports.items():
        for name in names:
            if name in table:
                raise ValueError(
                    f"{package}: {name!r} is exported by both .{table[name]} and .{submodule}"
                )
            table[name] = submodule

    def __getattr__(name: str) -> Any:
        submodule = table.get(name)
        if submodule is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f"{package}.{submodule}"), name)
        setattr(sys.modules[package], name, value)
        return value

    def __dir__() -> list[str]:
        return sorted(set(vars(sys.modules[package])) | set(table))

    return __getattr__, __dir__
