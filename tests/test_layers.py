"""The house: one folder per layer, imports only sideways or down, no circle across folders.

The floors (docs/extending.md, "Where things live"), top to bottom. Every ``embedkit`` import in
the package, including imports inside functions, is checked against them.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

import embedkit

PACKAGE = Path(embedkit.__file__).parent

FLOORS: dict[str, int] = {
    "__main__": 7,
    "cli": 7,
    "study": 6,
    "extract": 5,
    "probes": 5,
    "finetune": 5,
    "report": 5,
    "results": 4,
    "data": 3,
    "store": 3,
    "models": 3,
    "manifest": 3,
    "eval": 3,
    "errors": 0,
    "atomic": 0,
    "progress": 0,
    "versions": 0,
    "distributed": 0,
    "lazy": 0,
    "__init__": 0,
}


def _place(path: Path) -> str:
    """The folder (or ground-floor module) a package file belongs to."""
    rel = path.relative_to(PACKAGE)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def _target(name: str) -> str:
    return name.split(".")[1] if name.count(".") else "__init__"


def _imports() -> dict[str, set[tuple[str, str]]]:
    """Place -> {(importing file, imported embedkit module)}."""
    found: dict[str, set[tuple[str, str]]] = defaultdict(set)
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = str(path.relative_to(PACKAGE))
        for node in ast.walk(ast.parse(path.read_text())):
            names: list[str] = []
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                if node.module == "embedkit":
                    names = [f"embedkit.{alias.name}" for alias in node.names]
                elif node.module.startswith("embedkit."):
                    names = [node.module]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names if a.name.startswith("embedkit.")]
            for name in names:
                found[_place(path)].add((rel, name))
    return found


IMPORTS = _imports()


def test_every_place_has_a_floor() -> None:
    places = {_place(p) for p in PACKAGE.rglob("*.py")}
    assert places <= set(FLOORS), f"give these a floor in FLOORS: {sorted(places - set(FLOORS))}"


@pytest.mark.parametrize("place", sorted(IMPORTS))
def test_no_import_runs_up_a_floor(place: str) -> None:
    upward = [
        f"{file} imports {name}"
        for file, name in sorted(IMPORTS[place])
        if FLOORS[_target(name)] > FLOORS[place]
    ]
    assert not upward, "\n".join(upward)


def test_no_circle_spans_two_folders() -> None:
    graph: dict[str, set[str]] = defaultdict(set)
    for place, edges in IMPORTS.items():
        for _file, name in edges:
            if _target(name) != place:
                graph[place].add(_target(name))

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        for nxt in graph.get(start, set()):
            if nxt == goal or (nxt not in seen and reaches(nxt, goal, seen | {nxt})):
                return True
        return False

    circles = sorted(
        f"{a} -> {b} -> ... -> {a}" for a in graph for b in graph[a] if reaches(b, a, {b})
    )
    assert not circles, "\n".join(circles)
