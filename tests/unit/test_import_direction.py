"""Imports between sftkit's packages point one way (ARCHITECTURE.md): no cycles, counting
imports inside functions too; annotation-only (`TYPE_CHECKING`) and `__main__` imports are
left out, since they never run when the package is used."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "sftkit"


def unit(path: Path) -> str:
    """sftkit/<pkg>/... -> <pkg>; sftkit/<module>.py -> <module>."""
    parts = path.relative_to(PACKAGE).parts
    return parts[0] if len(parts) > 1 else parts[0].removesuffix(".py")


def imported(tree: ast.AST) -> list[str]:
    """Dotted sftkit modules imported by `tree`, outside TYPE_CHECKING and __main__ blocks."""
    names: list[str] = []
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and (
            "TYPE_CHECKING" in ast.unparse(node.test) or "__main__" in ast.unparse(node.test)
        ):
            continue
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.append(node.module)
            if node.module == "sftkit":
                names += [f"sftkit.{a.name}" for a in node.names]
        names += imported(node)
    return [n for n in names if n.startswith("sftkit.")]


def package_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        src = unit(path)
        for name in imported(ast.parse(path.read_text())):
            dst = name.split(".")[1]
            if dst != src:
                graph.setdefault(src, set()).add(dst)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    done: set[str] = set()

    def walk(node: str, path: list[str]) -> list[str] | None:
        if node in path:
            return path[path.index(node) :] + [node]
        if node in done:
            return None
        for nxt in sorted(graph.get(node, ())):
            cycle = walk(nxt, path + [node])
            if cycle:
                return cycle
        done.add(node)
        return None

    for start in sorted(graph):
        cycle = walk(start, [])
        if cycle:
            return cycle
    return None


def test_no_import_cycles_between_packages() -> None:
    graph = package_graph()
    assert graph["train"] >= {"config", "data", "model"}  # the scan sees real imports
    cycle = find_cycle(graph)
    assert cycle is None, " -> ".join(cycle or [])


def test_a_cycle_is_found() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
