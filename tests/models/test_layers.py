"""``embedkit/models`` is floor 3: it imports the ground floor, itself and (sideways) the store."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import embedkit

PACKAGE = Path(embedkit.__file__).parent
GROUND = {"errors", "atomic", "progress", "versions", "distributed"}


def _imported(folder: str) -> dict[str, set[str]]:
    """Module file -> the embedkit modules it imports (lazy imports inside functions too)."""
    found: dict[str, set[str]] = {}
    for path in sorted((PACKAGE / folder).rglob("*.py")):
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                if node.module == "embedkit":
                    names.update(f"embedkit.{alias.name}" for alias in node.names)
                elif node.module.startswith("embedkit."):
                    names.add(node.module)
            elif isinstance(node, ast.Import):
                names.update(a.name for a in node.names if a.name.startswith("embedkit."))
        found[path.name] = names
    return found


@pytest.mark.parametrize(("module", "imports"), sorted(_imported("models").items()))
def test_models_import_nothing_from_a_higher_floor(module: str, imports: set[str]) -> None:
    for name in imports:
        top = name.split(".")[1]
        assert top in GROUND | {"models", "store"}, f"models/{module} imports {name}"


def test_the_store_does_not_import_models_back() -> None:
    """models/pooling.py reads the store's derived-poolings table: no circle across folders."""
    for module, imports in _imported("store").items():
        assert not any(n.startswith("embedkit.models") for n in imports), f"store/{module}"
