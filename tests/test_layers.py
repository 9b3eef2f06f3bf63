"""The package's import graph (every import, function-level ones included, read from the
source): no cycles between modules or between packages, and the layers point one way: the
math (`precision`) and the ops (`kernels`, `triton_kernels`) import nothing of the package
above them; the unsharded modules (`modules`) only those; data, models and the planner's
pieces sit below the sharded code (`distributed`), which sits below the jobs (`jobs`), which
sit below the command line (`cli`)."""

import ast
from typing import Dict, List, Set

from conftest import ROOT

PACKAGE = ROOT / "shark_torchrec"
# Layer -> the packages its modules may import (besides their own).
_BOTTOM = {"precision", "kernels", "triton_kernels", "modules", "config"}
MAY_IMPORT = {
    "precision": set(),
    "kernels": set(),
    "triton_kernels": {"precision"},
    "modules": {"precision", "kernels", "triton_kernels"},
    "config": {"precision", "modules"},
    "data": {"config"},
    "models": _BOTTOM | {"data"},
    "planner": _BOTTOM | {"data", "models"},
    "distributed": _BOTTOM | {"data", "models", "planner"},
    "importance": _BOTTOM | {"data", "models", "distributed"},
    "report": {"precision"},
    "jobs": _BOTTOM | {"data", "models", "planner", "distributed", "importance", "report", "serve"},
    "cli": _BOTTOM | {"data", "distributed", "jobs", "report"},
    # the standalone serving recipe, copied into every export: nothing of the package
    "serve": set(),
    # the old name of `jobs`, a shim that re-exports it
    "train": {"jobs"},
}
# Modules stricter than their package: the math of F-Permutation's scores and tests sits beside
# the code that scores a sharded model, and imports none of the package.
MODULE_MAY_IMPORT = {
    "shark_torchrec.importance.scores": set(),
    "shark_torchrec.importance.significance": set(),
}


def import_graph() -> Dict[str, Set[str]]:
    """module -> the package's modules it imports (anywhere in its source)."""
    files = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        files[name] = path

    def resolve(name: str) -> str:
        while name and name not in files:
            name = name.rsplit(".", 1)[0] if "." in name else ""
        return name

    graph: Dict[str, Set[str]] = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        targets: List[str] = []
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets += [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(up + ([base] if base else []))
                targets += [base] + [f"{base}.{a.name}" for a in node.names]
        graph[name] = {r for t in targets if t.startswith("shark_torchrec") for r in [resolve(t)] if r and r != name}
    return graph


def cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    found: List[List[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
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

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def layer(module: str) -> str:
    """A module's package under shark_torchrec (a top-level module is its own: `cli`, `config`)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_no_module_imports_itself_back():
    assert cycles(import_graph()) == []


def test_no_package_imports_itself_back():
    packages: Dict[str, Set[str]] = {}
    for m, targets in import_graph().items():
        packages.setdefault(layer(m), set()).update(layer(t) for t in targets if layer(t) != layer(m))
    for targets in list(packages.values()):
        for t in targets:
            packages.setdefault(t, set())
    assert cycles(packages) == []


def test_the_layers_point_one_way():
    wrong = [
        f"{m} imports {t}"
        for m, targets in import_graph().items()
        if layer(m) in MAY_IMPORT
        for t in targets
        # "": the package's __init__ (its version only), read by `from shark_torchrec import kernels`.
        if layer(t) not in (layer(m), "") and layer(t) not in MAY_IMPORT[layer(m)]
    ]
    assert wrong == []


def test_every_package_has_a_layer_and_the_math_modules_import_no_package():
    graph = import_graph()
    assert {layer(m) for m in graph} - {""} <= set(MAY_IMPORT)
    wrong = [
        f"{m} imports {t}" for m, allowed in MODULE_MAY_IMPORT.items() for t in graph[m] if layer(t) not in allowed
    ]
    assert wrong == []


def test_the_graph_sees_function_level_imports_and_cycles():
    graph = import_graph()
    assert "shark_torchrec.precision.quantize" in graph["shark_torchrec.triton_kernels.reference"]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
