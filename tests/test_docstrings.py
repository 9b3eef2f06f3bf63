"""Every public function, class and method of the package says what it is: read from the source
with `ast` (nothing of the package is imported).

- Each public module-level function and class, and each public method (properties included) of a
  public class, has a docstring, but for the exemptions below.
- Each public module-level function, and each public method of a public class, that takes
  arguments has an `Args:` section (Google / TorchRec style), but for the exemptions below. A
  method's `self` / `cls` is not an argument; static and class methods are checked as the rest.
- Each such function or method that returns a value (a return annotation other than None, or a
  `return` of a value in its own body) has a `Returns:` (or, for a generator, `Yields:`)
  section, but for context managers and the exemptions below.
- Properties (`@property`, `@x.setter`) need only their docstring: they read as attributes.
"""

import ast
import re
from pathlib import Path
from typing import Iterator, List, Set, Tuple

from conftest import ROOT

PACKAGE = ROOT / "shark_torchrec"

# Methods that override a torch or TorchRec interface (nn.Module, TorchRec's sharded modules,
# sharders, lookups, kernels, fused optimizers, the planner's estimators, the collections'
# KJT interface): what they do is documented by the interface they implement. `validate` is the
# config groups' own check (`JobConfig.validate` documents it).
EXEMPT_METHODS = frozenset(
    {
        "forward",
        "backward",
        "flush",
        "purge",
        "step",
        "zero_grad",
        "shard",
        "sharding_types",
        "compute_kernels",
        "module_type",
        "sharded_module_type",
        "input_dist",
        "output_dist",
        "compute_and_output_dist",
        "init_data_parallel",
        "reset_parameters",
        "estimate",
        "named_parameters_by_table",
        "named_split_embedding_weights",
        "embedding_bag_configs",
        "is_weighted",
        "fused_optimizer",
        "config",
        "validate",
    }
)

# Triton kernels' helpers (`@triton.jit`, compiled from their source) are documented where it
# helps, not required to be.
TRITON_DIR = "triton_kernels"

ARGS_SECTION = re.compile(r"^\s*Args:\s*$", re.M)
RETURNS_SECTION = re.compile(r"^\s*(Returns|Yields):\s*$", re.M)

Function = (ast.FunctionDef, ast.AsyncFunctionDef)


def _is_public(name: str) -> bool:
    return not name.startswith("_")


def _is_triton_jit(node: ast.AST) -> bool:
    """Decorated with `triton.jit` (or `jit`), called or not."""
    for dec in getattr(node, "decorator_list", []):
        target = dec.func if isinstance(dec, ast.Call) else dec
        if isinstance(target, ast.Attribute) and target.attr == "jit":
            return True
        if isinstance(target, ast.Name) and target.id == "jit":
            return True
    return False


def _help_text_functions(tree: ast.Module) -> Set[str]:
    """Functions whose docstring the module reads as `name.__doc__`: a command's help text
    (`shark train --help` prints it whole), which an Args section would clutter."""
    return {
        node.value.id
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute) and node.attr == "__doc__" and isinstance(node.value, ast.Name)
    }


def _decorator_names(fn: ast.AST) -> Set[str]:
    """The last name of each decorator: `property`, `setter`, `staticmethod`, ..."""
    names = set()
    for dec in fn.decorator_list:
        target = dec.func if isinstance(dec, ast.Call) else dec
        if isinstance(target, ast.Attribute):
            names.add(target.attr)
        elif isinstance(target, ast.Name):
            names.add(target.id)
    return names


def _is_property(fn: ast.AST) -> bool:
    return bool(_decorator_names(fn) & {"property", "cached_property", "setter", "getter", "deleter"})


def _has_parameters(fn: ast.AST, method: bool = False) -> bool:
    """Takes arguments; a method's first one (`self` / `cls`) does not count, but for a static
    method's."""
    a = fn.args
    positional = a.posonlyargs + a.args
    if method and "staticmethod" not in _decorator_names(fn) and positional:
        positional = positional[1:]
    return bool(positional or a.kwonlyargs or a.vararg or a.kwarg)


def sources() -> Iterator[Tuple[Path, ast.Module]]:
    for path in sorted(PACKAGE.rglob("*.py")):
        yield path, ast.parse(path.read_text(), filename=str(path))


def _where(path: Path, node: ast.AST, name: str) -> str:
    return f"{path.relative_to(ROOT)}:{node.lineno} {name}"


def sectioned(path: Path, tree: ast.Module) -> Iterator[Tuple[ast.AST, str, bool]]:
    """(node, name, is_method) of each function or method of a file the `Args:` / `Returns:`
    checks hold: the public module-level functions and the public methods of public classes, less
    the exemptions, triton kernels, help texts and properties."""
    triton = TRITON_DIR in path.relative_to(PACKAGE).parts
    help_text = _help_text_functions(tree)
    for node in tree.body:
        if not isinstance(node, (*Function, ast.ClassDef)) or not _is_public(node.name):
            continue
        if triton and _is_triton_jit(node):
            continue
        if isinstance(node, Function):
            if node.name not in help_text:
                yield node, node.name, False
            continue
        for member in node.body:
            if not isinstance(member, Function) or not _is_public(member.name):
                continue
            if member.name in EXEMPT_METHODS or _is_property(member):
                continue
            yield member, f"{node.name}.{member.name}", True


def undocumented() -> List[str]:
    """file:line name of every public function, class or method without a docstring."""
    out = []
    for path, tree in sources():
        triton = TRITON_DIR in path.relative_to(PACKAGE).parts
        for node in tree.body:
            if not isinstance(node, (*Function, ast.ClassDef)) or not _is_public(node.name):
                continue
            if triton and _is_triton_jit(node):
                continue
            if ast.get_docstring(node) is None:
                out.append(_where(path, node, node.name))
            if not isinstance(node, ast.ClassDef):
                continue
            for member in node.body:
                if not isinstance(member, Function) or not _is_public(member.name):
                    continue
                if member.name in EXEMPT_METHODS:
                    continue
                if ast.get_docstring(member) is None:
                    out.append(_where(path, member, f"{node.name}.{member.name}"))
    return out


def missing_args_sections() -> List[str]:
    """file:line name of every public module-level function or public method with parameters
    whose docstring has no `Args:` section."""
    out = []
    for path, tree in sources():
        for node, name, method in sectioned(path, tree):
            if not _has_parameters(node, method):
                continue
            doc = ast.get_docstring(node)
            if doc is not None and not ARGS_SECTION.search(doc):
                out.append(_where(path, node, name))
    return out


def _returns_a_value(fn: ast.AST) -> bool:
    """A return annotation other than None, or a `return VALUE` / `yield` in the function's
    own body (not in functions or classes it defines)."""
    ann = fn.returns
    if ann is not None and not (isinstance(ann, ast.Constant) and ann.value is None):
        return True
    stack = list(fn.body)
    while stack:
        node = stack.pop()
        if isinstance(node, (*Function, ast.Lambda, ast.ClassDef)):
            continue
        if isinstance(node, ast.Return) and node.value is not None:
            if not (isinstance(node.value, ast.Constant) and node.value.value is None):
                return True
        if isinstance(node, (ast.Yield, ast.YieldFrom)):
            return True
        stack.extend(ast.iter_child_nodes(node))
    return False


def _is_context_manager(fn: ast.AST) -> bool:
    return any(
        (isinstance(d, ast.Name) and d.id == "contextmanager")
        or (isinstance(d, ast.Attribute) and d.attr == "contextmanager")
        for d in fn.decorator_list
    )


def missing_returns_sections() -> List[str]:
    """file:line name of every public module-level function or public method that returns a
    value and whose docstring has no `Returns:` / `Yields:` section."""
    out = []
    for path, tree in sources():
        for node, name, _ in sectioned(path, tree):
            if _is_context_manager(node) or not _returns_a_value(node):
                continue
            doc = ast.get_docstring(node)
            if doc is not None and not RETURNS_SECTION.search(doc):
                out.append(_where(path, node, name))
    return out


def test_public_names_have_docstrings():
    missing = undocumented()
    assert not missing, "public functions, classes and methods without a docstring:\n" + "\n".join(missing)


def test_public_functions_document_their_arguments():
    missing = missing_args_sections()
    assert not missing, "public functions and methods with arguments but no `Args:` section:\n" + "\n".join(missing)


def test_public_functions_document_what_they_return():
    missing = missing_returns_sections()
    assert not missing, (
        "public functions and methods that return a value but have no `Returns:` section:\n" + "\n".join(missing)
    )


def test_the_return_check_tells_values_from_none():
    def first(src: str) -> ast.AST:
        return ast.parse(src).body[0]

    assert _returns_a_value(first("def f() -> int:\n    pass"))
    assert _returns_a_value(first("def f():\n    if x:\n        return 1"))
    assert _returns_a_value(first("def f():\n    yield 1"))
    assert not _returns_a_value(first("def f() -> None:\n    return"))
    assert not _returns_a_value(first("def f():\n    def g():\n        return 1\n    g()"))


def test_the_method_checks_leave_out_self_and_properties():
    def first(src: str) -> ast.AST:
        return ast.parse(src).body[0]

    assert not _has_parameters(first("def m(self):\n    pass"), method=True)
    assert not _has_parameters(first("@classmethod\ndef m(cls):\n    pass"), method=True)
    assert _has_parameters(first("def m(self, x):\n    pass"), method=True)
    assert _has_parameters(first("def m(self, *, x):\n    pass"), method=True)
    assert _has_parameters(first("@staticmethod\ndef m(x):\n    pass"), method=True)
    assert _has_parameters(first("def f(x):\n    pass"))
    assert _is_property(first("@property\ndef p(self):\n    return 1"))
    assert _is_property(first("@p.setter\ndef p(self, v):\n    pass"))
    assert not _is_property(first("@torch.no_grad()\ndef m(self, x):\n    return x"))


def test_the_checks_see_what_they_look_for():
    """The walk finds the package's files, and the exemptions name methods that exist (a name
    no class defines any more is a stale exemption)."""
    files = list(sources())
    assert len(files) > 40
    methods = {
        member.name
        for _, tree in files
        for node in tree.body
        if isinstance(node, ast.ClassDef)
        for member in node.body
        if isinstance(member, Function)
    }
    stale = sorted(EXEMPT_METHODS - methods)
    assert not stale, f"exempted methods that no class of the package defines: {stale}"
