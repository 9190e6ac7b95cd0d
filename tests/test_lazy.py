"""Lazy package exports: the table, the TYPE_CHECKING imports and ``__all__`` agree."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
import types
from pathlib import Path

import pytest

import embedkit
from embedkit.lazy import lazy_exports

ROOT = Path(embedkit.__file__).parent
LAZY_PACKAGES = sorted(
    "embedkit." + init.parent.relative_to(ROOT).as_posix().replace("/", ".")
    for init in ROOT.rglob("__init__.py")
    if "lazy_exports(" in init.read_text()
)


def _type_checking_imports(package: str) -> dict[str, str]:
    """name -> module of the imports under ``if TYPE_CHECKING:`` in the package ``__init__``."""
    init = importlib.import_module(package).__file__
    assert init is not None
    found: dict[str, str] = {}
    for node in ast.parse(Path(init).read_text()).body:
        if isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING":
            for stmt in node.body:
                assert isinstance(stmt, ast.ImportFrom) and stmt.module, ast.unparse(stmt)
                found.update({alias.asname or alias.name: stmt.module for alias in stmt.names})
    return found


def test_the_lazy_packages_are_found() -> None:
    expected = {"extract", "finetune", "probes", "eval", "manifest", "models"}
    assert {f"embedkit.{name}" for name in expected} <= set(LAZY_PACKAGES)


@pytest.mark.parametrize("package", LAZY_PACKAGES)
def test_exports_match_the_type_checking_imports_and_all(package: str) -> None:
    module = importlib.import_module(package)
    typed = _type_checking_imports(package)
    assert typed, f"{package} gives the type checker no names"
    for name, source in typed.items():
        assert name in module.__all__, f"{package}.{name} is imported for typing but not in __all__"
        assert getattr(module, name) is getattr(importlib.import_module(source), name), name
    for name in module.__all__:
        assert name in typed or name in vars(module), f"{package}.__all__ names unknown {name!r}"
    helpers = {"TYPE_CHECKING", "lazy_exports", "annotations"}
    extra = {
        name
        for name in dir(module)
        if not name.startswith("_")
        and name not in module.__all__
        and name not in helpers
        and not isinstance(getattr(module, name), types.ModuleType)
    }
    assert not extra, f"{package} exports {sorted(extra)} outside __all__"


def test_a_name_loads_only_its_submodule() -> None:
    code = (
        "import sys, embedkit.eval as ev\n"
        "before = 'embedkit.eval.delong' in sys.modules\n"
        "auroc = ev.auroc\n"
        "middle = 'embedkit.eval.delong' in sys.modules, 'auroc' in vars(ev)\n"
        "ev.delong_ci\n"
        "print(before, middle, 'embedkit.eval.delong' in sys.modules, 'scipy' in sys.modules)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["False", "(False,", "True)", "True", "True"]


def test_unknown_names_and_dir() -> None:
    module = types.ModuleType("pkg_for_lazy_test")
    sys.modules[module.__name__] = module
    try:
        getattr_, dir_ = lazy_exports(module.__name__, {"sub": ("a", "b")})
        with pytest.raises(AttributeError, match="has no attribute 'c'"):
            getattr_("c")
        assert {"a", "b"} <= set(dir_())
        with pytest.raises(ModuleNotFoundError, match=r"pkg_for_lazy_test\.sub"):
            getattr_("a")
    finally:
        del sys.modules[module.__name__]


def test_a_name_exported_twice_is_refused() -> None:
    with pytest.raises(ValueError, match=r"'x' is exported by both \.one and \.two"):
        lazy_exports("pkg", {"one": ("x",), "two": ("x",)})
