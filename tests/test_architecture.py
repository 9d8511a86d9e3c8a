"""The shape of the package (docs/architecture.md): no import cycle among its modules, none over
600 lines.

The import graph is read from the source with ``ast``: every ``from .x import``, ``from ..x
import``, ``from mitoscope.x import`` and ``import mitoscope.x``, at module level and inside
functions alike (an import deferred into a function is still a dependency: it only moves the
cycle to run time). Imports under ``if TYPE_CHECKING:`` are left out: they never run.

Every module is held: no import cycle anywhere in the package, no module over 600 lines.
"""

from __future__ import annotations

import ast
from pathlib import Path

import mitoscope

PACKAGE = Path(mitoscope.__file__).parent
MAX_LINES = 600


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If):
            test = node.test
            name = test.id if isinstance(test, ast.Name) else test.attr if isinstance(test, ast.Attribute) else ""
            if name == "TYPE_CHECKING":
                skipped.update(id(sub) for statement in node.body for sub in ast.walk(statement))
    return skipped


def import_graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports (a name imported from a package counts as the
    package's submodule when there is one, else as the package)."""
    known = modules()

    def owner(name: str) -> str | None:
        while name and name not in known:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for name, path in known.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        skipped = _type_checking_nodes(tree)
        targets: set[str | None] = set()
        for node in ast.walk(tree):
            if id(node) in skipped:
                continue
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base_parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(base_parts + ([node.module] if node.module else []))
                else:
                    base = node.module or ""
                if base.split(".")[0] != "mitoscope":
                    continue
                for alias in node.names:
                    full = f"{base}.{alias.name}"
                    targets.add(full if full in known else owner(base))
            elif isinstance(node, ast.Import):
                targets.update(owner(alias.name) for alias in node.names if alias.name.split(".")[0] == "mitoscope")
        graph[name] = {target for target in targets if target and target != name}
    return graph


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in graph.get(todo.pop(), ()):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def tangles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import cycles, as groups of modules that each import one another (strongly connected
    components of more than one module), sorted."""
    reach = {name: reachable(graph, name) for name in graph}
    groups = {frozenset({name} | {other for other in reach[name] if name in reach.get(other, ())})
              for name in graph if name in reach[name]}
    return sorted(sorted(group) for group in groups)


def shortest_cycle(graph: dict[str, set[str]], start: str) -> str:
    """A shortest cycle through ``start``, as 'a -> b -> a' (for messages)."""
    before: dict[str, str] = {}
    todo = [start]
    while todo:
        node = todo.pop(0)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in before:
                before[nxt] = node
                todo.append(nxt)
        if start in before:
            break
    path, node = [start], before.get(start)
    while node is not None and node != start:
        path.append(node)
        node = before[node]
    return " -> ".join(name.removeprefix("mitoscope.") for name in [start, *reversed(path[1:]), start])


def describe(graph: dict[str, set[str]]) -> str:
    cycles = sorted({shortest_cycle(graph, name) for group in tangles(graph) for name in group})
    return "; ".join(cycles)


def oversized() -> list[str]:
    lengths = {path: len(path.read_text(encoding="utf-8").splitlines()) for path in modules().values()}
    return [f"{path.relative_to(PACKAGE)} ({n} lines)" for path, n in lengths.items() if n > MAX_LINES]


def test_the_graph_sees_imports_at_module_level_and_inside_functions():
    graph = import_graph()
    assert "mitoscope.errors" in graph["mitoscope.io.tables"]  # from ..errors import (module level)
    assert "mitoscope.finetune.module" in graph["mitoscope.finetune.training"]  # inside fit_phase
    assert "mitoscope.lightning_setup" in graph["mitoscope.finetune"]  # from ..lightning_setup in __init__
    assert "mitoscope.predictions" not in graph["mitoscope.localization"]  # under TYPE_CHECKING only
    toy = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a", "e"}, "e": {"d"}, "f": set()}
    assert tangles(toy) == [["a", "b", "c"], ["d", "e"]]
    assert shortest_cycle(toy, "b") == "b -> c -> a -> b"


def test_no_import_cycle():
    graph = import_graph()
    assert tangles(graph) == [], describe(graph)


def test_no_module_over_600_lines():
    assert oversized() == []
