"""The package's module-level imports form no cycle, and the lower layers import nothing above them."""

from __future__ import annotations

import ast
from pathlib import Path

import resfit

PACKAGE = Path(resfit.__file__).parent


def module_name(path: Path) -> str:
    parts = ["resfit", *path.relative_to(PACKAGE).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def module_level_imports(path: Path) -> set[str]:
    """resfit modules imported when ``path`` is imported (function bodies and TYPE_CHECKING blocks aside)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = (
        module_name(path).split(".") if path.name == "__init__.py" else module_name(path).split(".")[:-1]
    )
    found = set()
    for node in tree.body:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            continue
        for inner in ast.walk(node) if not isinstance(node, ast.FunctionDef | ast.ClassDef) else []:
            if isinstance(inner, ast.ImportFrom):
                base = package[: len(package) - inner.level + 1] if inner.level else []
                target = ".".join([*base, inner.module] if inner.module else base)
                if target.startswith("resfit"):
                    found.add(target)
                    found |= {f"{target}.{alias.name}" for alias in inner.names}
            elif isinstance(inner, ast.Import):
                found |= {alias.name for alias in inner.names if alias.name.startswith("resfit")}
    return found


def import_graph() -> dict[str, set[str]]:
    modules = {module_name(path): path for path in PACKAGE.rglob("*.py")}
    return {name: module_level_imports(path) & set(modules) - {name} for name, path in modules.items()}


def test_no_import_cycles():
    graph = import_graph()
    assert len(graph) > 40
    # a package imports its own modules from __init__; edges into a package mean its __init__
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == 1 and not node.startswith(target + "."):
                cycle = stack[stack.index(target) :] + [target]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_lower_layers_import_nothing_above_them():
    """data/ and models.py are the bottom of the flow data -> model -> train -> evaluate -> export/serve."""
    above = (
        "resfit.train",
        "resfit.inference",
        "resfit.serve",
        "resfit.compare",
        "resfit.cli",
        "resfit.export",
    )
    graph = import_graph()
    lower = [name for name in graph if name.startswith("resfit.data") or name == "resfit.models"]
    assert len(lower) > 10
    for name in lower:
        assert not {t for t in graph[name] if t.startswith(above)}, name
