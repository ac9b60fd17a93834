"""The layout shows the service: no import cycles, tools apart, functions a reader can hold."""

from __future__ import annotations

import ast

from tests.support.helpers import ROOT

SERVICE = ("app", "agents", "models", "sinks")
LONGEST = 60
# Longer on purpose, each with its reason (also in the function's docstring or comment).
LONG_ON_PURPOSE = {
    "app.faust_patches._lean_drain_messages": "a copy of faust 0.15.3's fetch loop, kept line for line",
    "agents.windows.WindowPolicy.apply": "the per-reading hot loop, inlined for speed (millstream bench)",
    "app.tools.bench.Bench.run": "the benchmark's phases in the order they run and are reported",
}


def modules() -> dict[str, ast.Module]:
    found = {}
    for package in SERVICE:
        for path in (ROOT / package).rglob("*.py"):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
            found[name] = ast.parse(path.read_text())
    return found


def imports(name: str, tree: ast.Module, known: set[str]) -> set[str]:
    """Project modules ``name`` imports anywhere, function-level imports included."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                out.add(full if full in known else node.module)
        elif isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
    return {m for m in out if m in known and m != name}


def test_no_import_cycle_in_the_service_packages() -> None:
    found = modules()
    graph = {name: imports(name, tree, set(found)) for name, tree in found.items()}
    done: set[str] = set()

    def visit(name: str, path: list[str]) -> None:
        if name in path:
            raise AssertionError("import cycle: " + " -> ".join([*path[path.index(name) :], name]))
        if name in done:
            return
        for other in sorted(graph[name]):
            visit(other, [*path, name])
        done.add(name)

    for name in sorted(graph):
        visit(name, [])


def test_the_service_never_imports_the_tools() -> None:
    found = modules()
    for name, tree in found.items():
        if name.startswith("app.tools") or name == "app.cli":  # the CLI starts the tools
            continue
        tools = {m for m in imports(name, tree, set(found)) if m.startswith("app.tools")}
        assert not tools, f"{name} imports {tools}"


def test_functions_are_short_enough_to_hold_at_once() -> None:
    long = []
    for name, tree in modules().items():
        for node in ast.walk(tree):
            for child in ast.iter_child_nodes(node):
                if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
                    prefix = f"{name}.{node.name}" if isinstance(node, ast.ClassDef) else name
                    qualified = f"{prefix}.{child.name}"
                    if child.end_lineno is not None and child.end_lineno - child.lineno + 1 > LONGEST:
                        long.append(qualified)
    assert set(long) <= set(LONG_ON_PURPOSE), sorted(set(long) - set(LONG_ON_PURPOSE))
