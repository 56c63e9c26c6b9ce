"""Imports between sftkit's packages point one way, in the order ARCHITECTURE.md states, and
the files of one package import each other without cycles; imports inside functions count
too; annotation-only (`TYPE_CHECKING`) and `__main__` imports are left out, since they never
run when the package is used."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "sftkit"
# Top to bottom: a unit imports only units below it. A new package gets its place here and
# in ARCHITECTURE.md's "Package order" line (the test checks both say the same).
ORDER = [
    "cli",
    "eval",
    "train",
    "checkpoint",
    "lifecycle",
    "data",
    "model",
    "dist",
    "parallel_dims",
    "batch",
    "hub",
    "errors",
    "config",
    "log",
]


def unit(path: Path) -> str:
    """sftkit/<pkg>/... -> <pkg>; sftkit/<module>.py -> <module>."""
    parts = path.relative_to(PACKAGE).parts
    return parts[0] if len(parts) > 1 else parts[0].removesuffix(".py")


def runtime_imports(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """Import statements of `tree`, outside TYPE_CHECKING and __main__ blocks."""
    found: list[ast.Import | ast.ImportFrom] = []
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and (
            "TYPE_CHECKING" in ast.unparse(node.test) or "__main__" in ast.unparse(node.test)
        ):
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        found += runtime_imports(node)
    return found


def imported(tree: ast.AST) -> list[str]:
    """Dotted sftkit modules imported by `tree`, outside TYPE_CHECKING and __main__ blocks."""
    names: list[str] = []
    for node in runtime_imports(tree):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif node.level == 0 and node.module:
            names.append(node.module)
            if node.module == "sftkit":
                names += [f"sftkit.{a.name}" for a in node.names]
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


def module_name(path: Path) -> str:
    """sftkit/model/attention.py -> sftkit.model.attention; a package's __init__ -> its name."""
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def module_graph() -> dict[str, set[str]]:
    """Edges between files of the same package (unit); `from sftkit.p import m` names m's
    file when m is a module, else the package's `__init__`."""
    files = {module_name(path): path for path in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for src, path in files.items():
        tree = ast.parse(path.read_text())
        for name in imported(tree) + imported_members(tree):
            while name not in files and "." in name:
                name = name.rsplit(".", 1)[0]
            same = name.split(".")[:2] == src.split(".")[:2]
            if name in files and name != src and same and len(src.split(".")) > 2:
                graph.setdefault(src, set()).add(name)
    return graph


def imported_members(tree: ast.AST) -> list[str]:
    """`from sftkit.p import m` as `sftkit.p.m` (a module or not: `module_graph` decides)."""
    return [
        f"{node.module}.{alias.name}"
        for node in runtime_imports(tree)
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("sftkit.")
        for alias in node.names
    ]


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


def test_packages_import_only_packages_below_them() -> None:
    graph = package_graph()
    units = {unit(path) for path in PACKAGE.rglob("*.py") if path.name != "__init__.py"}
    assert not units - set(ORDER), f"place {sorted(units - set(ORDER))} in ORDER"
    upward = [
        f"{src} -> {dst}"
        for src, dsts in graph.items()
        for dst in dsts
        if ORDER.index(dst) <= ORDER.index(src)
    ]
    assert not upward, upward


def test_architecture_states_the_package_order() -> None:
    stated = " > ".join(f"`{name}`" for name in ORDER)
    assert stated in (REPO / "ARCHITECTURE.md").read_text().replace("\n", " ")


def test_no_import_cycles_between_files_of_one_package() -> None:
    graph = module_graph()
    assert "sftkit.train.recipe" in graph  # the scan sees real imports
    assert "sftkit.train.loop" in graph["sftkit.train.recipe"]
    cycle = find_cycle(graph)
    assert cycle is None, " -> ".join(cycle or [])


def test_function_level_imports_count_and_annotation_only_ones_do_not() -> None:
    tree = ast.parse(
        "from typing import TYPE_CHECKING\n"
        "def f():\n    from sftkit.model.context_parallel import shard_batches\n"
        "if TYPE_CHECKING:\n    from sftkit.train.state import Run\n"
    )
    assert imported(tree) == ["sftkit.model.context_parallel"]
    assert imported_members(tree) == ["sftkit.model.context_parallel.shard_batches"]
