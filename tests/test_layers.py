"""The one-way layers of docs/architecture.md, read from the source: soda/ (the model and one run)
imports none of the layers above it, launching/ (from a command line to jobs) is not written
against the Hydra plugins that sit on top of it, and soda's own modules import each other without
a cycle. Every import counts: at module level, inside a function, and a module named as a string
to importlib.import_module.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import REPO

# Each layer and the top-level packages its modules may not import, with why.
FORBIDDEN = {
    "soda": {
        "launching": "the launch side builds on the run, not the other way round",
        "hydra_plugins": "Hydra's plugins are thin classes over launching/",
        "analysis": "analysis reads finished runs; a run never needs it",
        "bench": "benchmarks measure soda; soda does not measure itself",
    },
    "launching": {"hydra_plugins": "our Hydra plugins are thin classes over launching/, not the other way round"},
    "analysis": {
        "launching": "analysis reads runs and the store, whatever launched them",
        "hydra_plugins": "analysis reads runs and the store, whatever launched them",
    },
    "bench": {
        "launching": "benchmarks measure the model and the run, not how they are launched",
        "hydra_plugins": "benchmarks measure the model and the run, not how they are launched",
    },
}
# Imports a rule above lets through: (module's path, imported module) -> why. Keep it empty.
ALLOWED: dict[tuple[str, str], str] = {}


def module_name(path: Path, root: Path = REPO) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, root: Path = REPO) -> Iterator[tuple[int, str]]:
    """(line, module) for every module `path` imports: `import a.b`, `from a.b import c` (both
    a.b and a.b.c, which may be a module), and importlib.import_module("a.b") with a literal."""
    name = module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package, up level - 1 packages
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, *([base] if base else [])])
            yield node.lineno, base
            for alias in node.names:
                yield node.lineno, f"{base}.{alias.name}"
        elif isinstance(node, ast.Call) and _is_import_module(node.func) and node.args:
            first = node.args[0]
            if isinstance(first, ast.Constant) and isinstance(first.value, str):
                yield node.lineno, first.value


def _is_import_module(func: ast.expr) -> bool:
    return (isinstance(func, ast.Attribute) and func.attr == "import_module") or (
        isinstance(func, ast.Name) and func.id == "import_module"
    )


def layer_of(module: str) -> str | None:
    """The project's layer a module belongs to (its top-level package), or None for a library's.
    hydra_plugins is a namespace that installed libraries share (hydra_submitit_launcher): only
    its soda_* packages are ours."""
    parts = module.split(".")
    if parts[0] == "hydra_plugins" and len(parts) > 1 and not parts[1].startswith("soda_"):
        return None
    return parts[0]


def layer_violations(root: Path = REPO) -> list[str]:
    """Each import a rule of FORBIDDEN refuses, as `path:line imports module (why)`: one per line."""
    found: dict[tuple[str, int], str] = {}
    for layer, forbidden in FORBIDDEN.items():
        for path in sorted((root / layer).rglob("*.py")):
            relative = str(path.relative_to(root))
            for line, module in imported_modules(path, root):
                top = layer_of(module)
                if top in forbidden and (relative, module) not in ALLOWED:
                    found.setdefault((relative, line), f"{relative}:{line} imports {module} ({forbidden[top]})")
    return [found[key] for key in sorted(found)]


def import_cycles(root: Path = REPO, package: str = "soda") -> list[list[str]]:
    """The cycles among a package's modules (each strongly connected set of two or more modules
    that import one another, directly or not), with the modules of each cycle sorted."""
    paths = {module_name(path, root): path for path in (root / package).rglob("*.py")}
    graph = {
        name: {module for _, module in imported_modules(path, root) if module in paths and module != name}
        for name, path in paths.items()
    }
    # Tarjan's strongly connected components, iterative over the sorted graph (stable output).
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(start: str) -> None:
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, edges = work[-1]
            target = next(edges, None)
            if target is not None:
                if target not in index:
                    index[target] = low[target] = len(index)
                    stack.append(target)
                    on_stack.add(target)
                    work.append((target, iter(sorted(graph[target]))))
                elif target in on_stack:
                    low[node] = min(low[node], index[target])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    cycles.append(sorted(component))

    for name in sorted(graph):
        if name not in index:
            visit(name)
    return sorted(cycles)


def test_each_layer_imports_only_the_layers_below_it():
    assert layer_violations() == []


def test_soda_modules_import_each_other_without_a_cycle():
    assert import_cycles() == []


def test_every_allowed_exception_is_still_an_import():
    # An exception whose import is gone is a hole a new import could slip through.
    for (relative, module), why in ALLOWED.items():
        assert module in {name for _, name in imported_modules(REPO / relative)}, f"{relative}: {module} ({why})"


# The checks themselves: on a small tree that breaks each rule in one way.
@pytest.mark.parametrize(
    "path, source, expected",
    [
        ("soda/run.py", "import launching.jobs\n", "soda/run.py:1 imports launching.jobs"),
        ("soda/run.py", "def f():\n    from hydra_plugins import x\n", "soda/run.py:2 imports hydra_plugins"),
        ("soda/run.py", "from analysis.tables import t\n", "soda/run.py:1 imports analysis.tables"),
        (
            "soda/run.py",
            "import importlib\nimportlib.import_module('bench.throughput')\n",
            "soda/run.py:2 imports bench.throughput",
        ),
        ("launching/cli.py", "from hydra_plugins.soda_launchers import launchers\n", "launching/cli.py:1 imports"),
        ("analysis/runs.py", "from launching import jobs\n", "analysis/runs.py:1 imports launching"),
    ],
)
def test_a_forbidden_import_is_found(tmp_path, path, source, expected):
    for layer in FORBIDDEN:
        (tmp_path / layer).mkdir()
    (tmp_path / path).write_text(source)
    found = layer_violations(tmp_path)
    assert found and all(line.startswith(expected) for line in found), found


def test_an_import_cycle_is_found(tmp_path):
    (tmp_path / "soda" / "data").mkdir(parents=True)
    (tmp_path / "soda" / "__init__.py").write_text("")
    (tmp_path / "soda" / "a.py").write_text("from soda import b\n")
    (tmp_path / "soda" / "b.py").write_text("def f():\n    from soda.data.c import g\n")
    (tmp_path / "soda" / "data" / "__init__.py").write_text("")
    (tmp_path / "soda" / "data" / "c.py").write_text("from ..a import h\n")
    (tmp_path / "soda" / "d.py").write_text("import soda.a\n")  # into the cycle, not part of it
    assert import_cycles(tmp_path) == [["soda.a", "soda.b", "soda.data.c"]]


def test_a_library_s_hydra_plugin_is_not_a_layer():
    assert layer_of("hydra_plugins.hydra_submitit_launcher.config") is None
    assert layer_of("hydra_plugins.soda_launchers.launchers") == "hydra_plugins"
    assert layer_of("hydra_plugins") == "hydra_plugins"
