"""megamem's layering (DESIGN.md section 1, .importlinter): no module imports from a layer above it, and
no import cycles — imports inside functions count as much as those at the top of a file.

Two independent checks: import-linter's contracts, and a cycle search (Tarjan's strongly connected
components) over every import statement of every megamem module, read from the source with `ast`.
Each checker is also shown a small package with a violation, so a broken checker cannot pass.
"""
import ast
import os
import subprocess
import sys
import textwrap
from collections import defaultdict
from typing import Dict, List, Set

from conftest import ROOT

LINT_IMPORTS = os.path.join(os.path.dirname(sys.executable), "lint-imports")


def modules_of(root: str, package: str) -> Dict[str, str]:
    """{dotted module name: file} of every .py file of the package under root."""
    found = {}
    for folder, _, names in os.walk(os.path.join(root, package)):
        for name in names:
            if name.endswith(".py"):
                dotted = os.path.relpath(os.path.join(folder, name), root)[:-3].replace(os.sep, ".")
                found[dotted[:-len(".__init__")] if dotted.endswith(".__init__") else dotted] = os.path.join(folder, name)
    return found


def import_graph(root: str, package: str) -> Dict[str, Dict[str, int]]:
    """{module: {imported module of the package: line}} over every import statement, wherever it stands."""
    mods = modules_of(root, package)
    graph: Dict[str, Dict[str, int]] = defaultdict(dict)
    for mod, path in mods.items():
        here = mod if path.endswith("__init__.py") else mod.rpartition(".")[0]
        for node in ast.walk(ast.parse(open(path, encoding="utf-8").read(), path)):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parent = here
                    for _ in range(node.level - 1):
                        parent = parent.rpartition(".")[0]
                    base = f"{parent}.{base}" if base else parent
                # `from pkg import sub` imports the submodule pkg.sub; `from pkg import name`, pkg itself
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            else:
                continue
            for target in targets:
                while target and target not in mods:
                    target = target.rpartition(".")[0]
                if target and target != mod:
                    graph[mod].setdefault(target, node.lineno)
    return graph


def cycles(graph: Dict[str, Dict[str, int]]) -> List[List[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    found: List[List[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, {}):
            if w not in index:
                visit(w)
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

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10000))
    for v in list(graph):
        if v not in index:
            visit(v)
    return found


def describe(graph, component) -> str:
    return "\n".join(f"  {a}:{line} imports {b}" for a in component for b, line in sorted(graph[a].items())
                     if b in component)


def lint_imports(cwd: str, config: str, pythonpath: str) -> subprocess.CompletedProcess:
    assert os.path.isfile(LINT_IMPORTS), f"{LINT_IMPORTS} missing: run bash tools/setup_env.sh (import-linter)"
    return subprocess.run([LINT_IMPORTS, "--no-cache", "--config", config], cwd=cwd, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "PYTHONPATH": pythonpath})


def test_megamem_has_no_import_cycles():
    graph = import_graph(ROOT, "megamem")
    assert len(graph) > 50  # the whole package was read
    found = cycles(graph)
    assert not found, "import cycles among megamem modules:\n" + "\n".join(describe(graph, c) for c in found)


def test_megamem_keeps_its_layer_contracts():
    proc = lint_imports(ROOT, os.path.join(ROOT, ".importlinter"), ROOT)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "Contracts: 2 kept, 0 broken." in proc.stdout


def _package(tmp_path):
    """pkg.low imports pkg.high inside a function only: upward, and a cycle."""
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "low.py").write_text(textwrap.dedent("""
        def late():
            from .high import top
            return top
    """))
    (pkg / "high.py").write_text("from . import low\n\ntop = low\n")
    (tmp_path / "contract.ini").write_text(textwrap.dedent("""
        [importlinter]
        root_package = pkg

        [importlinter:contract:layers]
        name = layers
        type = layers
        containers = pkg
        layers =
            high
            low
    """))
    return tmp_path


def test_the_checkers_catch_an_import_inside_a_function(tmp_path):
    root = _package(tmp_path)
    graph = import_graph(str(root), "pkg")
    assert graph["pkg.low"] == {"pkg.high": 3} and graph["pkg.high"] == {"pkg.low": 1}
    assert cycles(graph) == [["pkg.high", "pkg.low"]]
    proc = lint_imports(str(root), str(root / "contract.ini"), str(root))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "pkg.low is not allowed to import pkg.high" in proc.stdout and "BROKEN" in proc.stdout
