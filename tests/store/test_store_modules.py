"""The store's modules keep their private names to themselves: no ``from embedkit.store.x
import _name`` and no ``module._name`` of a store module in another one."""

from __future__ import annotations

import ast
from pathlib import Path

import embedkit.store

STORE = Path(embedkit.store.__file__).parent


def _private_uses(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    aliases: dict[str, str] = {}  # local name -> store module it names
    found: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("embedkit.store"):
            for alias in node.names:
                if alias.name.startswith("_"):
                    found.append(f"{path.name}:{node.lineno} imports {node.module}.{alias.name}")
                if node.module == "embedkit.store":
                    aliases[alias.asname or alias.name] = alias.name
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("embedkit.store.") and alias.asname:
                    aliases[alias.asname] = alias.name
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id in aliases
            and node.attr.startswith("_")
        ):
            found.append(f"{path.name}:{node.lineno} uses {node.value.id}.{node.attr}")
    return found


def test_no_private_helper_is_imported_across_store_modules() -> None:
    modules = sorted(STORE.glob("*.py"))
    assert len(modules) > 10
    problems = [p for m in modules for p in _private_uses(m)]
    assert problems == []


def test_the_check_finds_private_imports(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text(
        "from embedkit.store.layout import _UNIT_FILE\n"
        "import embedkit.store.writer as w\n"
        "w._any_nonfinite_parallel\n"
    )
    assert len(_private_uses(bad)) == 2
