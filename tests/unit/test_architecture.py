"""The package's import graph, read with `ast` (nothing is imported): no cycles, and the layers point down.

Every `import` counts, also those inside functions (a lazy import is still a dependency); only imports under
`if TYPE_CHECKING:` are left out, since they never run.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "platform" / "mmfusion"
MAX_MODULE_LINES = 400

# layer -> packages it must never import (models is pure torch: no training, serving or tuning code)
FORBIDDEN = {
    "mmfusion.models": ("mmfusion.train", "mmfusion.serving", "mmfusion.tune", "mmfusion.evaluate",
                        "mmfusion.cli"),
    "mmfusion.data": ("mmfusion.train", "mmfusion.serving", "mmfusion.tune", "mmfusion.cli"),
    "mmfusion.config": ("mmfusion.models", "mmfusion.data", "mmfusion.train", "mmfusion.serving"),
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """The mmfusion modules `path` imports (a `from pkg import name` that names a submodule counts as it)."""
    here = module_name(path)
    is_pkg = path.name == "__init__.py"
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for other in child.orelse:
                    visit(other)
                continue
            if isinstance(child, ast.Import):
                found.update(a.name for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:  # relative import
                    anchor = here.split(".") if is_pkg else here.split(".")[:-1]
                    anchor = anchor[: len(anchor) - (child.level - 1)]
                    base = ".".join([*anchor, base] if base else anchor)
                found.add(base)
                found.update(f"{base}.{a.name}" for a in child.names)
            visit(child)

    visit(ast.parse(path.read_text(encoding="utf-8")))
    return {m for m in found if m in modules and m != here}


def import_graph() -> dict[str, set[str]]:
    files = sorted(PACKAGE.rglob("*.py"))
    modules = {module_name(f) for f in files}
    return {module_name(f): imports_of(f, modules) for f in files}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done
    stack: list[str] = []

    def dfs(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if _parent_package(node, nxt):  # a module may import its own package's __init__
                continue
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if state.get(nxt) is None and (cycle := dfs(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if state.get(node) is None and (cycle := dfs(node)):
            return cycle
    return None


def _parent_package(node: str, target: str) -> bool:
    return node.startswith(target + ".")


def test_graph_sees_lazy_imports() -> None:
    graph = import_graph()
    assert "mmfusion.config" in graph["mmfusion.cli"]  # sanity: the reader finds real edges
    assert any("mmfusion.models" in m for m in graph["mmfusion.artifact"])  # a lazy, in-function import


def test_no_import_cycles() -> None:
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_cycle_finder_finds_a_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_layers_point_down() -> None:
    graph = import_graph()
    bad = [f"{mod} imports {dep}" for mod, deps in graph.items() for layer, banned in FORBIDDEN.items()
           if mod == layer or mod.startswith(layer + ".") for dep in deps
           if any(dep == b or dep.startswith(b + ".") for b in banned)]
    assert not bad, "\n".join(bad)


def test_modules_stay_small() -> None:
    long = {str(f.relative_to(PACKAGE)): n for f in PACKAGE.rglob("*.py")
            if (n := len(f.read_text(encoding="utf-8").splitlines())) > MAX_MODULE_LINES}
    assert not long, f"modules over {MAX_MODULE_LINES} lines: {long}"
