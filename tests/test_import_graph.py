"""The modules of emdask import each other without a cycle, and never import Prefect.

The graph is read from the source, not from a running interpreter: every ``import`` and
``from ... import`` anywhere in a module (inside functions too, where an import would
otherwise hide a cycle) is an edge to the emdask module it names. ``from package import
name`` is an edge to ``package.name`` when that is a module, else to ``package``.
"""

import ast
from importlib.machinery import EXTENSION_SUFFIXES
from pathlib import Path

import emdask

ROOT = Path(emdask.__file__).resolve().parent


def _modules():
    """``{dotted name: path}`` of every module of the package; ``None`` for the path of a
    compiled extension module (it imports nothing of the package)."""
    out = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    for path in sorted(ROOT.rglob("*")):
        # the most specific suffix first (".cpython-311-x86_64-linux-gnu.so", then ".so")
        suffix = next((s for s in EXTENSION_SUFFIXES if path.name.endswith(s)), None)
        if suffix:
            parts = path.relative_to(ROOT.parent).parts
            out[".".join(parts[:-1] + (path.name[: -len(suffix)],))] = None
    return out


def _imports(name, path, modules):
    """``[(imported module, line)]``: every import of ``name`` (at ``path``) that names a
    module of the package, and every ``prefect`` import (as ``'prefect'``)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                found.append((alias.name, node.lineno))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            for alias in node.names:
                child = f"{source}.{alias.name}"
                found.append((child if child in modules else source, node.lineno))
    out = []
    for target, line in found:
        if target == "prefect" or target.startswith("prefect."):
            out.append(("prefect", line))
            continue
        # the closest enclosing module of the package (``emdask.engine.data.x`` -> its module)
        while target and target not in modules:
            target = target.rpartition(".")[0]
        if target and target != name:
            out.append((target, line))
    return out


def _graph():
    modules = _modules()
    return modules, {name: _imports(name, path, modules) if path else []
                     for name, path in modules.items()}


def _find_cycle(graph):
    """One cycle of ``graph`` as a list of ``(module, line of its import of the next)``,
    or ``None``."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        for target, line in graph.get(node, ()):
            if target not in graph:
                continue
            stack.append((node, line))
            if state.get(target) == "open":
                start = next(i for i, (n, _) in enumerate(stack) if n == target)
                return stack[start:]
            if target not in state:
                found = visit(target)
                if found:
                    return found
            stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_the_graph_sees_every_module_and_relative_import():
    modules, graph = _graph()
    assert "emdask.estimators.base" in modules and "emdask" in modules
    targets = {t for t, _ in graph["emdask.estimators.gaussian"]}
    assert "emdask.estimators.base" in targets  # ``from .base import``
    assert "emdask.families.gaussian" in targets  # ``from ..families.gaussian import``
    assert _find_cycle({"a": [("b", 1)], "b": [("c", 2)], "c": [("a", 3)]}) == [
        ("a", 1),
        ("b", 2),
        ("c", 3),
    ]
    assert _find_cycle({"a": [("b", 1)], "b": []}) is None


def test_emdask_modules_import_each_other_without_a_cycle():
    _, graph = _graph()
    cycle = _find_cycle(graph)
    if cycle:
        steps = [f"{module} (line {line})" for module, line in cycle] + [cycle[0][0]]
        raise AssertionError("import cycle: " + " -> ".join(steps))


def test_emdask_never_imports_prefect():
    _, graph = _graph()
    users = {
        f"{module} (line {line})"
        for module, edges in graph.items()
        for target, line in edges
        if target == "prefect"
    }
    assert not users, f"emdask imports prefect in {sorted(users)}; flows belong in pipelines/"
