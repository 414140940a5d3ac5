"""The package's import graph, read statically with ``ast``: no module of uvkerneld/ or kernel_stub/
reaches itself through imports, and the kernel stub reaches only the standard library and a few
cheap uvkerneld modules.

Three kinds of import edge are told apart, because they fail differently:
- ``module``: runs when the module is imported (top level, class bodies, ``try``/``if`` blocks);
  a cycle of these is an import-order bug waiting for the next reordering.
- ``function``: runs when a function is first called; a cycle here still means two modules that
  cannot be understood (or tested) one without the other.
- ``type-checking``: under ``if TYPE_CHECKING:``, read only by mypy; a cycle here is the same
  design knot, hidden from the interpreter.
The strict test forbids cycles of any kind; a second test names import-time cycles on their own,
since those are also a runtime hazard.
"""

from __future__ import annotations

import ast
import glob
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("uvkerneld", "kernel_stub")

# Edges (importer, imported) tolerated while the code that needs them is being reshaped. Each entry
# is checked to still exist, so a fix that removes the edge also forces its entry out of this list.
ALLOWED_CYCLE_EDGES: frozenset[tuple[str, str]] = frozenset()

# What the kernel stub may reach, at any depth and through imports of any kind (the stub runs on
# every kernel start, under -I -S, before any venv exists). fsafety is imported only on the path
# where the stub starts the daemon itself.
STUB_ALLOWED_MODULES = frozenset({
    "kernel_stub", "kernel_stub.__main__", "kernel_stub.stub",
    "uvkerneld", "uvkerneld.client", "uvkerneld.protocol", "uvkerneld.locations", "uvkerneld.fastjson",
    "uvkerneld.nbdecl", "uvkerneld.fsafety", "uvkerneld.envid", "uvkerneld.envvars", "uvkerneld.procs",
})


@dataclass(frozen=True)
class Edge:
    source: str
    target: str
    kind: str  # "module", "function" or "type-checking"
    where: str  # path:line of the import statement

    def describe(self) -> str:
        return "%s -> %s (%s import, %s)" % (self.source, self.target, self.kind, self.where)


def package_modules() -> dict[str, Path]:
    modules: dict[str, Path] = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            parts = list(path.relative_to(REPO).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The module of ours that importing ``name`` runs: the longest known prefix of it."""
    parts = name.split(".")
    while parts:
        candidate = ".".join(parts)
        if candidate in modules:
            return candidate
        parts.pop()
    return None


def _targets(node: ast.Import | ast.ImportFrom, module: str, path: Path,
             modules: dict[str, Path]) -> list[tuple[str, str]]:
    """(imported name as written, our module it resolves to) for each name ``node`` imports from us."""
    found: list[tuple[str, str]] = []
    if isinstance(node, ast.Import):
        for alias in node.names:
            if alias.name.split(".")[0] in PACKAGES:
                resolved = _resolve(alias.name, modules)
                if resolved:
                    found.append((alias.name, resolved))
        return found
    if node.level:
        package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
        base_parts = package[: len(package) - (node.level - 1)]
        base = ".".join(base_parts + ([node.module] if node.module else []))
    else:
        base = node.module or ""
    if base.split(".")[0] not in PACKAGES:
        return found
    for alias in node.names:
        # `from pkg import name` imports the submodule pkg.name when there is one, else pkg itself.
        resolved = _resolve(base + "." + alias.name, modules) if alias.name != "*" else None
        if resolved != base + "." + alias.name:
            resolved = _resolve(base, modules)
        if resolved:
            found.append((base + "." + alias.name, resolved))
    return found


def import_edges(modules: dict[str, Path]) -> list[Edge]:
    edges: list[Edge] = []
    seen: set[Edge] = set()
    for module, path in modules.items():
        tree = ast.parse(path.read_text(), str(path))
        where_prefix = str(path.relative_to(REPO))

        # visit runs to its end within this iteration (below), so the loop variables it reads
        # are this module's.
        def visit(node: ast.AST, kind: str) -> None:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for _, target in _targets(node, module, path, modules):  # noqa: B023
                    edge = Edge(module, target, kind, "%s:%d" % (where_prefix, node.lineno))  # noqa: B023
                    # `from .x import a, b` is one edge, not one per name.
                    if target != module and edge not in seen:  # noqa: B023
                        seen.add(edge)
                        edges.append(edge)
                return
            if isinstance(node, ast.If) and _is_type_checking(node.test):
                for child in node.body:
                    visit(child, "type-checking")
                for child in node.orelse:
                    visit(child, kind)
                return
            inner = kind
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)) and kind == "module":
                inner = "function"
            for child in ast.iter_child_nodes(node):
                visit(child, inner)

        visit(tree, "module")
    return edges


def find_cycles(edges: list[Edge]) -> list[list[Edge]]:
    """One cycle, as its chain of edges, for each strongly connected group of modules (Tarjan)."""
    graph: dict[str, list[Edge]] = {}
    for edge in edges:
        graph.setdefault(edge.source, []).append(edge)
        graph.setdefault(edge.target, [])
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[set[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for edge in graph[node]:
            if edge.target not in index:
                connect(edge.target)
                low[node] = min(low[node], low[edge.target])
            elif edge.target in on_stack:
                low[node] = min(low[node], index[edge.target])
        if low[node] == index[node]:
            group: set[str] = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.add(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(group)

    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 10 * len(graph) + 100))
    try:
        for node in sorted(graph):
            if node not in index:
                connect(node)
    finally:
        sys.setrecursionlimit(limit)
    cycles = []
    for group in groups:
        start = min(group)
        # Shortest way back to the start inside the group (breadth first), so the message is short.
        came_by: dict[str, Edge] = {}
        frontier = [start]
        closing: Edge | None = None
        while frontier and closing is None:
            following = []
            for node in frontier:
                for edge in graph[node]:
                    if edge.target == start:
                        closing = edge
                        break
                    if edge.target in group and edge.target not in came_by:
                        came_by[edge.target] = edge
                        following.append(edge.target)
                if closing is not None:
                    break
            frontier = following
        assert closing is not None
        path = [closing]
        while path[0].source != start:
            path.insert(0, came_by[path[0].source])
        cycles.append(path)
    return cycles


def format_cycles(cycles: list[list[Edge]]) -> str:
    return "\n".join("import cycle:\n  " + "\n  ".join(edge.describe() for edge in cycle) for cycle in cycles)


def test_no_import_cycle_of_any_kind() -> None:
    edges = [edge for edge in import_edges(package_modules())
             if (edge.source, edge.target) not in ALLOWED_CYCLE_EDGES]
    cycles = find_cycles(edges)
    assert not cycles, format_cycles(cycles) + (
        "\nMove the shared part into a module both can import, or pass the object in instead of "
        "importing its class; a TYPE_CHECKING import counts too.")


def test_no_import_cycle_at_import_time() -> None:
    # Subsumed by the strict test except for the allow-list: an allowed edge never excuses an
    # import-time cycle, since that one breaks as soon as someone reorders imports.
    cycles = find_cycles([edge for edge in import_edges(package_modules()) if edge.kind == "module"])
    assert not cycles, format_cycles(cycles)


def test_allowed_cycle_edges_still_exist() -> None:
    # A fix that removes an allowed edge must take it off the list too, or the list would keep
    # excusing the same cycle if it came back.
    present = {(edge.source, edge.target) for edge in import_edges(package_modules())}
    gone = sorted(ALLOWED_CYCLE_EDGES - present)
    assert not gone, "no longer imported, delete from ALLOWED_CYCLE_EDGES in tests/test_imports.py: %s" % gone


def test_kernel_stub_reaches_only_the_standard_library_and_cheap_modules() -> None:
    # tests/test_protocol.py checks what importing the stub loads at run time; this checks every
    # import the stub could ever run, including those inside functions (error paths, autostart).
    modules = package_modules()
    edges = import_edges(modules)
    reached = {"kernel_stub.__main__"}
    frontier = ["kernel_stub.__main__"]
    via: dict[str, Edge] = {}
    while frontier:
        node = frontier.pop()
        # Importing a.b.c runs the __init__ of a and a.b first: the stub pays for those too.
        parents = [Edge(node, node.rsplit(".", 1)[0], "module", "parent package")] if "." in node else []
        for edge in edges + parents:
            if edge.source == node and edge.target not in reached:
                reached.add(edge.target)
                via[edge.target] = edge
                frontier.append(edge.target)
    extra = sorted(reached - STUB_ALLOWED_MODULES)
    assert not extra, "the kernel stub reaches %s, through: %s" % (
        extra, "; ".join(via[name].describe() for name in extra))
    foreign = []
    for name in sorted(reached):
        for node in ast.walk(ast.parse(modules[name].read_text())):
            if isinstance(node, ast.Import):
                imported = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                imported = [node.module or ""]
            else:
                continue
            for full in imported:
                top = full.split(".")[0]
                if top not in PACKAGES and top not in sys.stdlib_module_names:
                    foreign.append("%s imports %s (line %d)" % (name, full, node.lineno))
    assert not foreign, foreign


def test_the_graph_reader_sees_each_kind_of_import() -> None:
    # The checks above pass trivially if the reader misses imports; make sure it sees each form.
    modules = package_modules()
    kinds = {(edge.source, edge.target): edge.kind for edge in import_edges(modules)}
    assert kinds[("kernel_stub.stub", "uvkerneld.protocol")] == "module"  # from uvkerneld import a, b
    assert kinds[("uvkerneld.client", "uvkerneld.protocol")] == "module"  # from . import protocol
    assert kinds[("kernel_stub.stub", "uvkerneld.fsafety")] == "function"
    assert len(modules) > 20 and "uvkerneld.server" in modules


def test_a_planted_cycle_is_reported_with_its_path() -> None:
    edges = [Edge("p.a", "p.b", "module", "a.py:1"), Edge("p.b", "p.c", "function", "b.py:2"),
             Edge("p.c", "p.a", "type-checking", "c.py:3"), Edge("p.c", "p.d", "module", "c.py:4")]
    (cycle,) = find_cycles(edges)
    assert [edge.source for edge in cycle] == ["p.a", "p.b", "p.c"]
    text = format_cycles([cycle])
    assert "p.c -> p.a (type-checking import, c.py:3)" in text
    assert find_cycles(edges[:2] + edges[3:]) == []


def test_the_daemon_and_the_notebook_commands_import_on_python_310(tmp_path: Path) -> None:
    """pyproject says requires-python >= 3.10: on 3.10 tomllib is tomli (tomlcompat owns that choice)."""
    from uvkerneld.uv import find_uv

    uv = find_uv(None)
    env = dict(os.environ, UV_PYTHON_DOWNLOADS="never")
    if os.environ.get("UVKERNELD_TEST_CACHE"):
        env["UV_CACHE_DIR"] = os.environ["UVKERNELD_TEST_CACHE"]
    found = subprocess.run([uv, "python", "find", "3.10"], capture_output=True, text=True, env=env,
                           timeout=60)
    # pyenv's versions are not on uv's search path unless selected: look there too.
    candidates = ([found.stdout.strip()] if found.returncode == 0 else []) + sorted(
        glob.glob(os.path.expanduser("~/.pyenv/versions/3.10*/bin/python3.10")))
    if not candidates:
        pytest.skip("no Python 3.10 on this host")
    venv = tmp_path / "py310"
    subprocess.run([uv, "venv", "--quiet", "--python", candidates[0], str(venv)],
                   check=True, env=env, timeout=120)
    # The pure-Python dependencies these modules import on 3.10 (pyproject's list for < 3.11).
    subprocess.run([uv, "pip", "install", "--quiet", "--python", str(venv / "bin" / "python"),
                    "packaging>=23", "tomli>=2.0"], check=True, env=env, timeout=300)
    result = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import uvkerneld.ops, uvkerneld.nbcommands"],
        capture_output=True, text=True, cwd=str(REPO), env=dict(env, PYTHONPATH=str(REPO)), timeout=60)
    assert result.returncode == 0, result.stderr
