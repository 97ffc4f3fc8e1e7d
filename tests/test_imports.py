"""The import graph of ``elastic/``: no cycle anywhere, and the wire package in layers.

The graph is read from the source (``ast``), so every import counts: module level
and inside functions (a lazy import closes a circle as surely as any), but not the
ones under ``if TYPE_CHECKING:``, which never run.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "elastic"

# The wire package imports one way: each module may import only those before it
# (and, outside the wire, only the error types and the type rule).
WIRE_LAYERS = ["header", "shm", "shared", "buffers", "tensors", "parts", "frames", "transport"]
WIRE_MAY_IMPORT = {"elastic.errors", "elastic.typecheck", "elastic.wire"}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """The ``elastic`` modules ``path`` imports (a name imported from a package that
    is a module of its own counts as that module)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def add(target: str) -> None:
        while target and target not in modules:
            target = target.rpartition(".")[0]
        if target and target != name:
            found.add(target)

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _type_checking(child):
                for other in child.orelse:
                    visit(other)
            elif isinstance(child, ast.Import):
                for alias in child.names:
                    add(alias.name)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    anchor = package.split(".")[: len(package.split(".")) - child.level + 1]
                    base = ".".join([*anchor, base] if base else anchor)
                add(base)
                for alias in child.names:
                    if f"{base}.{alias.name}" in modules:
                        add(f"{base}.{alias.name}")
            else:
                visit(child)

    visit(ast.parse(path.read_text(), filename=str(path)))
    return found


def import_graph() -> dict[str, set[str]]:
    paths = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: imports_of(path, set(paths)) for name, path in paths.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return found


def test_the_graph_is_read_in_full() -> None:
    graph = import_graph()
    assert len(graph) > 50
    assert "elastic.wire.tensors" in graph["elastic.wire.frames"]
    assert (
        "elastic.wire.frames" in graph["elastic.wire.transport"]
    )  # a lazy import, inside a function
    assert "elastic.wire.tensors" not in graph["elastic.wire.header"]  # under TYPE_CHECKING only


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_anywhere_in_elastic() -> None:
    graph = import_graph()
    found = cycles(graph)
    assert not found, "import cycles: " + "; ".join(
        " ".join(f"{m} -> {sorted(graph[m] & set(c))}" for m in c) for c in found
    )


def test_the_wire_package_imports_one_way() -> None:
    graph = import_graph()
    wire = {m for m in graph if m.startswith("elastic.wire.")}
    assert wire == {f"elastic.wire.{layer}" for layer in WIRE_LAYERS}, (
        "a new wire module needs its place in WIRE_LAYERS"
    )
    for i, layer in enumerate(WIRE_LAYERS):
        allowed = WIRE_MAY_IMPORT | {f"elastic.wire.{below}" for below in WIRE_LAYERS[:i]}
        wrong = graph[f"elastic.wire.{layer}"] - allowed
        assert not wrong, (
            f"elastic.wire.{layer} imports {sorted(wrong)}; it may import only {sorted(allowed)}"
        )


def test_plugin_authors_need_only_elastic_api() -> None:
    """The first-party plugins import what they need from ``elastic.api``, as a third
    party's would (and their own package)."""
    for path in (ROOT / "plugins").rglob("*.py"):
        found = {
            m
            for m in imports_of(path, set(import_graph()) | {"elastic.api"})
            if m.startswith("elastic")
        }
        assert found <= {"elastic.api"}, f"{path.relative_to(ROOT)} imports {sorted(found)}"


def test_the_dtype_table_is_torchs() -> None:
    from elastic.wire.header import DTYPE_SIZES
    from elastic.wire.tensors import DTYPES

    assert {name: dtype.itemsize for name, dtype in DTYPES.items()} == DTYPE_SIZES
    assert all(dtype is getattr(torch, name) for name, dtype in DTYPES.items())


def test_headers_and_the_control_client_load_without_torch() -> None:
    """``elastic job ...`` reads only headers: it must start without importing torch."""
    code = (
        "import sys, elastic.wire.header, elastic.wire.transport, elastic.cli.control; "
        "sys.exit('torch' in sys.modules)"
    )
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT, timeout=60).returncode == 0
